"""Load an open_clip model as fastprompt's frozen backbone.

Weights come from an open_clip pretrained tag ("openai", "laion2b_s34b_b88k", ...), from a local
checkpoint file, or from random initialisation (tests, the demo). The backbone is always frozen
and in eval mode; prompt methods train only their own parameters on top of it.
"""
from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import open_clip
import torch
from torch import nn

from .shipped_weights import load_into, shipped_checkpoint, shipped_tags

__all__ = ["ClipBundle", "load_clip", "available_models", "TINY_MODEL"]

# Small configs shipped with fastprompt (a tiny ViT for tests and the CPU demo).
_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)
TINY_MODEL = "fastprompt-tiny"

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


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

    def to(self, device) -> "ClipBundle":
        self.model.to(device)
        self.device = torch.device(device)
        return self


def available_models():
    return sorted(open_clip.list_models())


def _resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz"))


class _DropRandomInitWarning(logging.Filter):
    # open_clip warns on the root logger that no weights were loaded; random init is asked for here.
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _create_random(name: str, seed: int) -> nn.Module:
    """Random init from its own seed: every process and every rerun builds the same backbone
    (a resumed run or `fastprompt eval` must load trained prompts into the same CLIP), and the
    caller's global RNG is left as it was."""
    quiet = _DropRandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return open_clip.create_model(name, pretrained=None)
    finally:
        logging.getLogger().removeFilter(quiet)


def _create(name: str, pretrained: Optional[str], seed: int) -> nn.Module:
    if name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown open_clip model {name!r}.{hint} See fastprompt.clip.available_models().")
    if pretrained is None or pretrained == "none":
        return _create_random(name, seed)
    shipped = shipped_checkpoint(name, pretrained)
    if shipped is not None:  # weights inside the package (fastprompt-world/world): no network
        return load_into(_create_random(name, seed), shipped)
    if os.path.isfile(pretrained):
        try:
            return open_clip.create_model(name, pretrained=pretrained)
        except Exception as err:  # open_clip raises RuntimeError/KeyError on mismatched keys or shapes
            raise ValueError(
                f"checkpoint {pretrained!r} does not fit open_clip model {name!r}: {err}. "
                "Check that the file holds weights of this architecture (model name and size)."
            ) from err
    if _looks_like_path(pretrained):
        raise FileNotFoundError(
            f"checkpoint file {pretrained!r} for model {name!r} does not exist; pass an existing file, "
            "an open_clip pretrained tag, or None for random weights"
        )
    tags = open_clip.list_pretrained_tags_by_model(name) + shipped_tags(name)
    if pretrained not in tags:
        raise ValueError(
            f"{pretrained!r} is neither a file nor a pretrained tag of {name!r}; "
            f"its tags are: {', '.join(tags) or '(none)'}"
        )
    try:
        return open_clip.create_model(name, pretrained=pretrained)
    except Exception as err:
        raise RuntimeError(
            f"could not fetch the {pretrained!r} weights of {name!r} ({err}). Without network access, "
            "download the checkpoint elsewhere and pass its local path as `pretrained`."
        ) from err


def load_clip(
    name: str,
    pretrained: Optional[str] = None,
    *,
    dtype: Union[str, torch.dtype] = torch.float32,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
) -> ClipBundle:
    """Build open_clip model `name`, frozen and in eval mode, in `dtype` on `device`.

    pretrained: None (random init from `seed`, the same weights every time), an open_clip tag, a tag
    of weights shipped with fastprompt (`load_clip("fastprompt-world", "world")`), or a local
    checkpoint file.
    """
    dtype = _resolve_dtype(dtype)
    model = _create(name, pretrained, seed)
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
    )
