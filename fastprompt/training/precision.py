"""Mixed precision over fp32 master weights: autocast for bf16/fp16, a GradScaler for fp16."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch

__all__ = ["PRECISION_DTYPES", "autocast_context", "Precision"]

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: torch.device, precision: str):
    """Autocast for bf16/fp16; fp32 runs plain. Weights that train stay fp32 either way."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISION_DTYPES[precision])


class Precision:
    """How a training step computes (train.precision): the forward under autocast, and for fp16 a
    GradScaler that scales the loss, unscales the gradients before clipping and skips the update
    when a gradient is inf/NaN.

    "fp32" is also the official-style baseline's mode: its fp16 lives in the frozen weights, and it
    runs without autocast or loss scaling, as the research code does.
    """

    def __init__(self, name: str, device: torch.device):
        if name not in PRECISION_DTYPES:
            raise ValueError(f"precision must be one of {', '.join(PRECISION_DTYPES)}, got {name!r}")
        self.name, self.device = name, device
        self.scaler: Optional[torch.amp.GradScaler] = torch.amp.GradScaler(device.type) if name == "fp16" else None

    @property
    def skips_bad_steps(self) -> bool:
        """fp16: an inf/NaN step is skipped by the GradScaler instead of ending the run."""
        return self.scaler is not None

    def autocast(self):
        return autocast_context(self.device, self.name)

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # skips the update when a gradient is inf/NaN
        self.scaler.update()

    def state_dict(self) -> Optional[dict]:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
