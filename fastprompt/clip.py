"""Load an open_clip model as fastprompt's frozen backbone, with the architecture its weights need.

Weights come from an open_clip pretrained tag ("openai", "laion2b_s34b_b88k", ...), from weights
shipped inside fastprompt (fastprompt.shipped_weights: `fastprompt-world`/"world", the demo's),
from a local checkpoint file, or from random initialisation (tests, `fastprompt demo --smoke`). The
backbone is always frozen and in eval mode; prompt methods train only their own parameters on top
of it.

The activation is part of the architecture the weights were trained with, and the model name alone
does not say it: OpenAI trained every CLIP with QuickGELU (x * sigmoid(1.702 x)), open_clip's plain
names (`ViT-B-16`) build nn.GELU, and open_clip only warns on the mismatch. Features of OpenAI
weights in a GELU tower are ~1% off. So:
- a pretrained tag builds the activation the tag was trained with (open_clip's table says it);
- an OpenAI checkpoint archive (the TorchScript `.pt` files OpenAI's `clip` package caches in
  ~/.cache/clip, which the research codebases load) builds QuickGELU, as OpenAI's own loader does;
- a plain state-dict file carries no activation: the model name decides (`*-quickgelu` names build
  QuickGELU), and a log line says which was built and how to choose the other;
- weights shipped with fastprompt build the activation recorded with them (fastprompt-world's
  pretraining built its model config's nn.GELU);
- random init: the model name decides.
"""
from __future__ import annotations

import difflib
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import open_clip
import torch
from torch import nn

from .errors import MissingFileError, ModelError
from .shipped_weights import ShippedWeights, load_into, shipped_checkpoint, shipped_tags

__all__ = ["ClipBundle", "load_clip", "available_models", "TINY_MODEL"]

log = logging.getLogger(__name__)

# Small configs shipped with fastprompt (a tiny ViT for tests and the CPU demo).
_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)
TINY_MODEL = "fastprompt-tiny"

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}

# Entries of OpenAI's archives that are not weights (open_clip's loader drops them too).
_OPENAI_ARCHIVE_SCALARS = ("input_resolution", "context_length", "vocab_size")


@dataclass
class ClipBundle:
    """A frozen open_clip model with what prompt methods need to know about it."""

    model: nn.Module
    tokenizer: Callable
    name: str
    image_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    embed_dim: int
    logit_scale: float  # the multiplier s = exp(CLIP's logit_scale parameter)
    dtype: torch.dtype
    device: torch.device
    activation: str = "gelu"  # "quick_gelu" or "gelu": the MLP activation the towers were built with
    build_note: str = ""  # which activation was built and why (logged at load and in each run's train.log)

    def to(self, device) -> "ClipBundle":
        self.model.to(device)
        self.device = torch.device(device)
        return self


def available_models():
    return sorted(open_clip.list_models())


def _resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ModelError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ModelError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz"))


def _name_builds_quick_gelu(name: str) -> bool:
    return bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))


def _activation(model: nn.Module) -> str:
    """What the built towers really use (read off the modules, not the config)."""
    quick = any(isinstance(m, open_clip.transformer.QuickGELU) for m in model.modules())
    return "quick_gelu" if quick else "gelu"


def _quick_gelu_twin(name: str) -> Optional[str]:
    twin = f"{name}-quickgelu"
    return twin if twin in open_clip.list_models() else None


def is_openai_archive(path: Union[str, Path]) -> bool:
    """True for a TorchScript archive (OpenAI's checkpoint format): a zip holding compiled `code/`.
    torch.save files are zips too, but hold no code."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(entry.split("/", 1)[-1].startswith("code/") for entry in archive.namelist())


class _DropOpenClipNoise(logging.Filter):
    # open_clip logs on the root logger that no weights were loaded; random init is asked for here.
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _build(name: str, seed: int, quick_gelu: Optional[bool], **kwargs) -> nn.Module:
    """open_clip.create_model with the activation fixed (None: the name's own). Random init draws from
    its own seed: every process and every rerun builds the same backbone (a resumed run or
    `fastprompt eval` must load trained prompts into the same CLIP), and the caller's global RNG is
    left as it was."""
    if quick_gelu is True:
        kwargs["force_quick_gelu"] = True
    elif quick_gelu is False and _name_builds_quick_gelu(name):
        kwargs["quick_gelu"] = False  # a model-config override (open_clip applies it last)
    quiet = _DropOpenClipNoise()
    logging.getLogger().addFilter(quiet)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return open_clip.create_model(name, **kwargs)
    finally:
        logging.getLogger().removeFilter(quiet)


def _misfit(path: str, name: str, err: Exception) -> ModelError:
    return ModelError(
        f"checkpoint {path!r} does not fit open_clip model {name!r}: {err}. Check that the file holds "
        "weights of this architecture (model name and size): an OpenAI CLIP archive, or a state dict "
        "saved from this open_clip model."
    )


def _load_openai_archive(name: str, path: str, seed: int, preprocess: Optional[dict]) -> nn.Module:
    """An OpenAI TorchScript archive: its tensors (same names as open_clip's CLIP) into `name` built
    with QuickGELU, the activation every OpenAI model was trained with.

    torch.jit.load is the only reader of this format (OpenAI's loader and open_clip's use it too); it
    reads the archive's tensors and TorchScript code, not arbitrary pickled Python objects."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch marks TorchScript deprecated; the files remain
            state = torch.jit.load(path, map_location="cpu").state_dict()
    except Exception as err:  # noqa: BLE001 - a damaged archive: say which file
        raise ModelError(f"checkpoint {path!r} looks like an OpenAI TorchScript archive but cannot be read: {err}") from err
    state = {k: v for k, v in state.items() if k not in _OPENAI_ARCHIVE_SCALARS}
    model = _build(name, seed, True, pretrained=None, force_preprocess_cfg=preprocess)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise _misfit(path, name, err) from err
    return model


@dataclass
class _Built:
    model: nn.Module
    why: str  # why the towers have their activation (logged)
    ambiguous: bool = False  # a state dict whose name builds GELU where a QuickGELU twin exists


def _from_file(name: str, path: str, seed: int, quick_gelu: Optional[bool] = None,
               preprocess: Optional[dict] = None) -> _Built:
    """A local file: an OpenAI archive (QuickGELU), or a state dict built with `quick_gelu` (None:
    the model name decides)."""
    if is_openai_archive(path):
        if quick_gelu is False:
            raise ModelError(f"{path!r} is an OpenAI CLIP archive; OpenAI trained it with QuickGELU, not GELU")
        return _Built(_load_openai_archive(name, path, seed, preprocess),
                      f"{path} is an OpenAI checkpoint archive: OpenAI trained with QuickGELU")
    try:
        model = _build(name, seed, quick_gelu, pretrained=path, force_preprocess_cfg=preprocess)
    except Exception as err:  # open_clip raises RuntimeError/KeyError/UnpicklingError on a misfit
        raise _misfit(path, name, err) from err
    if quick_gelu is not None:
        return _Built(model, "")
    why = f"{path} is a state dict, which carries no activation: the model name {name!r} decides"
    twin = None if _name_builds_quick_gelu(name) else _quick_gelu_twin(name)
    if twin is not None:
        why += f"; for OpenAI weights (trained with QuickGELU) use model name {twin!r}"
    return _Built(model, why, ambiguous=twin is not None)


def _check_tag(name: str, tag: str) -> dict:
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag in tags:
        return open_clip.get_pretrained_cfg(name, tag)
    tags = tags + shipped_tags(name)
    owners = [m for m in open_clip.list_models() if tag in open_clip.list_pretrained_tags_by_model(m)]
    related = [m for m in owners if m.startswith(name) or name.startswith(m)]
    hint = f" Tag {tag!r} belongs to {', '.join(related)}." if related else ""
    raise ModelError(
        f"{tag!r} is neither a file nor a pretrained tag of {name!r}; its tags are: {', '.join(tags) or '(none)'}.{hint}"
    )


def _from_tag(name: str, tag: str, seed: int) -> _Built:
    """Fetch the tag's file through open_clip (cached after the first download), then load it as a
    local file with the activation and preprocessing open_clip's table records for that tag."""
    cfg = _check_tag(name, tag)
    recorded = cfg.get("quick_gelu")  # None: the table does not say, and the model config decides
    quick_gelu = _name_builds_quick_gelu(name) if recorded is None else bool(recorded)
    try:
        path = open_clip.pretrained.download_pretrained(cfg)
    except Exception as err:
        raise ModelError(
            f"could not fetch the {tag!r} weights of {name!r} ({err}). Without network access, download "
            "the checkpoint elsewhere and pass its local path as `pretrained` (for OpenAI weights, the "
            "archive OpenAI's clip package keeps in ~/.cache/clip, e.g. ViT-B-16.pt)."
        ) from err
    built = _from_file(name, path, seed, quick_gelu, preprocess=cfg)
    built.why = f"pretrained tag {tag!r} was trained with {'QuickGELU' if quick_gelu else 'GELU'}"
    return built


def _from_shipped(shipped: ShippedWeights, seed: int) -> _Built:
    """Weights inside the package, in towers built with the activation they were pretrained with
    (recorded beside them), whatever the model config would build."""
    model = load_into(_build(shipped.model, seed, shipped.quick_gelu, pretrained=None), shipped)
    act = "QuickGELU" if shipped.quick_gelu else "GELU"
    return _Built(model, f"weights {shipped.tag!r} shipped with fastprompt were pretrained with {act}")


def _create(name: str, pretrained: Optional[str], seed: int) -> _Built:
    if name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"unknown open_clip model {name!r}.{hint} See fastprompt.clip.available_models().")
    if pretrained is None or pretrained == "none":
        return _Built(_build(name, seed, None, pretrained=None), f"random weights: the model name {name!r} decides")
    shipped = shipped_checkpoint(name, pretrained)
    if shipped is not None:  # weights inside the package (fastprompt-world/world): no network
        return _from_shipped(shipped, seed)
    pretrained = os.path.expanduser(pretrained)  # ~/.cache/clip/ViT-B-16.pt, as the research code keeps it
    if os.path.isfile(pretrained):
        return _from_file(name, pretrained, seed)
    if _looks_like_path(pretrained):
        raise MissingFileError(
            f"checkpoint file {pretrained!r} for model {name!r} does not exist; pass an existing file, "
            "an open_clip pretrained tag, or None for random weights"
        )
    return _from_tag(name, pretrained, seed)


def load_clip(
    name: str,
    pretrained: Optional[str] = None,
    *,
    dtype: Union[str, torch.dtype] = torch.float32,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
) -> ClipBundle:
    """Build open_clip model `name`, frozen and in eval mode, in `dtype` on `device`, with the
    activation its weights were trained with (see the module docstring).

    pretrained: None (random init from `seed`, the same weights every time), an open_clip tag, a tag
    of weights shipped with fastprompt (`load_clip("fastprompt-world", "world")`), a local OpenAI
    checkpoint archive, or a local state-dict file.
    """
    dtype = _resolve_dtype(dtype)
    built = _create(name, pretrained, seed)
    model, activation = built.model, _activation(built.model)
    note = f"towers built with {'QuickGELU' if activation == 'quick_gelu' else 'nn.GELU'} ({built.why})"
    log.log(logging.WARNING if built.ambiguous else logging.INFO, "%s: %s", name, note)
    model.eval()
    model.requires_grad_(False)
    # Read the temperature before a cast to bf16/fp16 rounds it (bf16 would turn s = 100 into ~99.6).
    logit_scale = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
    model.to(device=device, dtype=dtype)

    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    mean = tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(pp.get("std", open_clip.OPENAI_DATASET_STD))
    embed_dim = model.visual.output_dim
    return ClipBundle(
        model=model,
        tokenizer=open_clip.get_tokenizer(name),
        name=name,
        image_size=int(size),
        mean=mean,
        std=std,
        embed_dim=int(embed_dim),
        logit_scale=logit_scale,
        dtype=dtype,
        device=torch.device(device),
        activation=activation,
        build_note=note,
    )
