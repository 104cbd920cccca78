"""One training step, the same for the loop (`fit`), the benchmark and the official-style baseline.

Forward under the run's precision, backward, optional gradient clipping, optimiser update. The
benchmark times the step's phases through the `phase` hook ("head": the forward, of which the
encoders' own time is recorded by their wrappers as nested phases; "backward"; "optimizer");
everywhere else the hook records nothing.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable, Optional

import torch

from .precision import Precision

__all__ = ["train_step", "no_phase", "PHASES"]

PHASES = ("head", "backward", "optimizer")


def no_phase(name: str) -> ContextManager:
    return nullcontext()


def train_step(
    forward: Callable,
    inputs,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    *,
    grad_clip: Optional[float] = None,
    params: Optional[Iterable[torch.Tensor]] = None,
    phase: Callable[[str], ContextManager] = no_phase,
) -> torch.Tensor:
    """Train on one batch; returns the (detached) loss.

    forward(inputs, labels) returns an object with `.loss` (a model, or its `forward_features` when
    `inputs` are precomputed image features); `params` are what `grad_clip` clips (max norm).
    """
    with phase("head"), precision.autocast():
        loss = forward(inputs, labels).loss
    with phase("backward"):
        precision.backward(loss, optimizer)
    with phase("optimizer"):
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(params), grad_clip)
        precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()
