"""torch.compile of the encoders, with sizes that change between class lists compiled dynamic.

What is compiled is each encoder's trunk (transformer blocks, final norm, pooling, projection):
the text trunk takes the assembled prompts [N, L, W] and pool indices [N], the image trunk a
batch of images. N (classes, or batch x classes for CoCoOp), L (the prompts' cut length) and the
image batch are marked dynamic on every call, so switching base -> new classes, another dataset
or a last, smaller feature batch reuses the compiled code instead of recompiling. Prompt
assembly, chunking and checkpointing stay in eager Python around it.
"""
from __future__ import annotations

import torch
from torch import nn

from .encoders import ImageEncoder, TextEncoder

__all__ = ["compile_encoders"]


def _dynamic(fn, dims: dict[int, tuple[int, ...]]):
    """Wrap `fn` so positional tensor argument i has its dims `dims[i]` marked dynamic."""

    def call(*args, **kwargs):
        for i, ds in dims.items():
            for d in ds:
                if args[i].shape[d] > 1:  # size-1 dims are specialised by dynamo whatever we say
                    torch._dynamo.mark_dynamic(args[i], d)
        return fn(*args, **kwargs)

    call.__wrapped__ = fn
    return call


def compile_encoders(model: nn.Module, *, cuda_graphs: bool = False, **compile_options) -> nn.Module:
    """Compile every TextEncoder and ImageEncoder trunk of `model` in place; returns `model`.

    cuda_graphs: on a CUDA device, replay each trunk as a CUDA graph (torch.compile's
    "reduce-overhead" mode: one graph per distinct shape), for steps bound by kernel launches
    (small batches, few classes); ignored without CUDA. compile_options go to torch.compile
    (e.g. backend=...). Idempotent: an encoder compiled once is left as it is.
    """
    if cuda_graphs and torch.cuda.is_available():
        compile_options.setdefault("mode", "reduce-overhead")
    for module in model.modules():
        if getattr(module, "_fastprompt_compiled", False):
            continue
        if isinstance(module, TextEncoder):
            compiled = torch.compile(module._encode_rows, **compile_options)
            module._encode_rows = _dynamic(compiled, {0: (0, 1), 1: (0,)})
        elif isinstance(module, ImageEncoder):
            compiled = torch.compile(module.forward, **compile_options)
            module.forward = _dynamic(compiled, {0: (0,)})
        else:
            continue
        module._fastprompt_compiled = True
    return model
