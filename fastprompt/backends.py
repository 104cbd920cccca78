"""Which implementation runs each tower's attention and DePT's CAT head, and why.

Every method takes `attention_backend` and DePT takes `head_backend`. The default, `auto`, picks
per call from the tensors it is given:

* attention: fastprompt's fused Triton op (`triton`) on a CUDA GPU of compute capability 8.0 or
  newer where Triton imports and the call suits it (fp16/bf16/fp32, head dim <= 128); everywhere
  else `sdpa`: torch's fused attention, and for DPL's decoupled layers the decomposition computed
  from fused SDPA calls (fastprompt.kernels.decoupled_attention_sdpa), never the eager op that
  materialises the score matrices;
* head: the fused Triton CAT head + loss on such a GPU (fp16/bf16/fp32); elsewhere the plain
  PyTorch head (`reference`: a scale/shift, one matmul and a cross-entropy, already what eager
  torch runs well).

An explicit choice always wins: `reference` (the plain-PyTorch specification, eager), `sdpa`,
`triton` (refused at model build where it cannot run: fastprompt.protocols.session). The kernels'
tiles are sized for sm_80 and sm_90 (docs/kernels.md); older GPUs take the SDPA path under `auto`.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastprompt.kernels.validation import TRITON_DTYPES, device_arch

__all__ = ["AUTO", "ATTENTION_BACKENDS", "HEAD_BACKENDS", "MIN_TRITON_ARCH", "MAX_TRITON_HEAD_DIM",
           "triton_unavailable", "attention_backend_for", "head_backend_for", "describe_backends"]

AUTO = "auto"
ATTENTION_BACKENDS = (AUTO, "reference", "sdpa", "triton")
HEAD_BACKENDS = (AUTO, "reference", "triton")
MIN_TRITON_ARCH = 80  # the kernels' tiles: sm_80 (Ampere) and sm_90 (Hopper)
MAX_TRITON_HEAD_DIM = 128  # the attention kernel's largest head dim

# device -> None (the fused kernels run there) or why not; filled on first use per device so
# that the per-call choice is a dictionary read (also under torch.compile).
_TRITON_ON: dict[torch.device, Optional[str]] = {}


def triton_unavailable(device: torch.device) -> Optional[str]:
    """None where `auto` may run fastprompt's Triton kernels on `device`, else the reason why not."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _TRITON_ON:
        _TRITON_ON[device] = _why_not_triton(device)
    return _TRITON_ON[device]


def _why_not_triton(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"{device.type} device: the Triton kernels run natively on CUDA GPUs only"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    arch = device_arch(device)
    if arch < MIN_TRITON_ARCH:
        return f"sm_{arch} GPU: the kernels' tiles are sized for sm_{MIN_TRITON_ARCH} and newer"
    return None


def attention_backend_for(requested: str, qkv: torch.Tensor, head_dim: int) -> str:
    """The backend one attention call runs: `requested` unless it is `auto` (see the module doc)."""
    if requested != AUTO:
        return requested
    fused = (qkv.device.type == "cuda" and qkv.dtype in TRITON_DTYPES and head_dim <= MAX_TRITON_HEAD_DIM
             and triton_unavailable(qkv.device) is None)
    return "triton" if fused else "sdpa"


def head_backend_for(requested: str, image_features: torch.Tensor) -> str:
    """The backend one CAT head call runs: `requested` unless it is `auto` (see the module doc)."""
    if requested != AUTO:
        return requested
    fused = (image_features.device.type == "cuda" and image_features.dtype in TRITON_DTYPES
             and triton_unavailable(image_features.device) is None)
    return "triton" if fused else "reference"


def describe_backends(attention: str, head: Optional[str], device: torch.device) -> str:
    """One line for the log at model build: what runs the attention (and DePT's head) on `device`
    for the usual training dtypes, and why."""
    device = torch.device(device)
    why_not = triton_unavailable(device)
    where = _device_name(device)

    def one(what: str, requested: str, fallback: str) -> str:
        if requested != AUTO:
            return f"{what} {requested} (asked for)"
        if why_not is None:
            return f"{what} auto -> triton ({where})"
        return f"{what} auto -> {fallback} ({why_not})"

    parts = [one("attention:", attention, "sdpa")]
    if head is not None:
        parts.append(one("CAT head:", head, "reference"))
    return "; ".join(parts)


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return str(device)
    import triton

    return f"{torch.cuda.get_device_name(device)}, sm_{device_arch(device)}, Triton {triton.__version__}"
