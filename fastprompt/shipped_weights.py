"""CLIP weights that ship inside the package, loadable by (model name, tag) with no network.

`load_clip(name, tag)` asks `shipped_checkpoint(name, tag)` before open_clip's own pretrained
tags. A shipped file is a safetensors archive in fp16 whose token embedding is stored sparsely:
only the rows of tokens the model was trained on (`<key>.ids` int64 [K], `<key>.rows` [K, W]);
every other row loads as zeros. Pretraining leaves untouched rows at their random initial value,
which carries no information, and zeros keep the file a few MB instead of 12.6 MB for
49,408 x 128 values. A user prompt with words the model never saw embeds them as zeros.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import MissingFileError, ModelError

__all__ = ["ShippedWeights", "SHIPPED", "shipped_checkpoint", "shipped_tags", "pack_state_dict",
           "unpack_state_dict", "save_packed", "load_packed"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
FORMAT = "fastprompt-sparse-embedding-v1"
SPARSE_KEY = "token_embedding.weight"


@dataclass(frozen=True)
class ShippedWeights:
    model: str  # the open_clip model config name
    tag: str
    file: Path
    description: str
    quick_gelu: bool  # the MLP activation the weights were pretrained with (QuickGELU, else nn.GELU)


SHIPPED: dict[tuple[str, str], ShippedWeights] = {
    ("fastprompt-world", "world"): ShippedWeights(
        "fastprompt-world", "world", WEIGHTS_DIR / "fastprompt-world.safetensors",
        "pretrained on fastprompt's rendered world (`fastprompt world pretrain`, docs/world.md)",
        quick_gelu=False,  # pretraining builds the model config's own activation, nn.GELU
    ),
}


def shipped_tags(name: str) -> list[str]:
    return [tag for (model, tag) in SHIPPED if model == name]


def shipped_checkpoint(name: str, tag: str | None) -> ShippedWeights | None:
    """The shipped weights registered as (name, tag), or None."""
    return SHIPPED.get((name, tag)) if tag is not None else None


def pack_state_dict(state_dict: dict[str, torch.Tensor], keep_rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """fp16 copies of every tensor; SPARSE_KEY reduced to the rows `keep_rows` (int64 [K])."""
    packed = {}
    for key, value in state_dict.items():
        if key == SPARSE_KEY:
            ids = keep_rows.to(torch.int64).unique()
            packed[key + ".ids"] = ids.contiguous()
            packed[key + ".rows"] = value.detach()[ids].to(torch.float16).contiguous()
        else:
            packed[key] = value.detach().to(torch.float16).contiguous().clone()
    return packed


def unpack_state_dict(packed: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full state dict (shapes and dtypes of `like`) from `pack_state_dict`'s output."""
    missing = [k for k in like if k not in packed and not (k == SPARSE_KEY and k + ".ids" in packed)]
    extra = [k for k in packed if k not in like and k not in (SPARSE_KEY + ".ids", SPARSE_KEY + ".rows")]
    if missing or extra:
        raise ModelError(f"shipped weights do not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    full = {}
    for key, ref in like.items():
        if key == SPARSE_KEY and key + ".ids" in packed:
            table = torch.zeros_like(ref)
            table[packed[key + ".ids"]] = packed[key + ".rows"].to(ref.dtype)
            full[key] = table
        else:
            if packed[key].shape != ref.shape:
                raise ModelError(f"shipped weights: {key} has shape {tuple(packed[key].shape)}, the model "
                                 f"expects {tuple(ref.shape)}")
            full[key] = packed[key].to(ref.dtype)
    return full


def save_packed(path: str | Path, packed: dict[str, torch.Tensor], metadata: dict) -> None:
    from safetensors.torch import save

    from .atomic_io import atomic_write_bytes

    meta = {"format": FORMAT, "info": json.dumps(metadata, sort_keys=True)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(path), save(packed, metadata=meta))


def load_packed(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(packed tensors, the metadata recorded at save time)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ModelError(f"{path} is not a fastprompt shipped-weights file (format {meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, json.loads(meta.get("info", "{}"))


def load_into(model: nn.Module, weights: ShippedWeights) -> nn.Module:
    """Load `weights` into `model` (built from the same config); errors say what to do."""
    if not weights.file.is_file():
        raise MissingFileError(
            f"the shipped weights {weights.model}/{weights.tag} are missing ({weights.file}); reinstall "
            "fastprompt, or rebuild them with `fastprompt world pretrain --out " + str(weights.file) + "`"
        )
    packed, _ = load_packed(weights.file)
    model.load_state_dict(unpack_state_dict(packed, model.state_dict()), strict=True)
    return model
