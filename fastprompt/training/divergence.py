"""Inf/NaN losses: counted per epoch; without a GradScaler they end the run before anything from
the diverged steps is saved, with advice; with fp16's GradScaler those steps are skipped and counted.

The tally stays on the device (no host sync per step); it is read at log steps and epoch ends. Only
once a run has diverged are its training images looked at: NaN/inf there is the input's fault, not
the learning rate's or the precision's, and the error says so.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import distributed
from ..errors import DatasetError, DivergenceError

__all__ = ["LossTally", "diverged_message", "diverged_error", "nonfinite_input_error"]


def nonfinite_input_error(source, *, chunk: int = 256) -> Optional[DatasetError]:
    """A DatasetError when the training images of `source` (a BatchSource) hold NaN or inf, else
    None. Reads every image once: called only after a run diverged, never per step."""
    labels = getattr(source, "labels", None)
    if labels is None or not hasattr(source, "batch"):
        return None
    n, bad, first = len(labels), 0, None
    for start in range(0, n, chunk):
        images, _ = source.batch(torch.arange(start, min(start + chunk, n)))
        rows = list(images) if isinstance(images, (list, tuple)) else images
        if not (rows[0] if isinstance(rows, list) else rows).is_floating_point():
            return None  # decoded uint8 images cannot hold NaN
        finite = [bool(torch.isfinite(r).all()) for r in rows]
        bad += finite.count(False)
        if first is None and False in finite:
            first = start + finite.index(False)
    if not bad:
        return None
    return DatasetError(f"{bad} of {n} training images hold NaN or inf values (the first: image {first}): the input "
                        "is broken, not the training (not the learning rate, not mixed precision); fix or drop those "
                        "images (or the BatchSource given to fit) and train again")


def diverged_message(epoch: int, step: int) -> str:
    return (f"training diverged in epoch {epoch} (by step {step}): the loss or the trained weights became inf/NaN; "
            "the run stopped and the last good checkpoint is kept. Try a lower optim.lr, optim.grad_clip=1.0, "
            "or train.precision=bf16 instead of fp16 (with changed settings, train into a new output_dir; docs/training.md)")


def diverged_error(exc: Exception, params: list[torch.Tensor], *, epoch: int, step: int,
                   since_resume: bool) -> Optional[DivergenceError]:
    """A value check inside the model (e.g. the CAT head's finite-features check) can be the first to
    see weights that diverged: the DivergenceError to raise instead of `exc`, naming the cause, or
    None when `exc` is something else."""
    weights_bad = not all(bool(torch.isfinite(p).all()) for p in params)
    if weights_bad or (since_resume and "NaN" in str(exc)):
        return DivergenceError(f"{diverged_message(epoch, step)} [the model said: {exc}]")
    return None


class LossTally:
    """One epoch's finite losses on this rank: their sum and their count (steps minus count = inf/NaN)."""

    def __init__(self, device: torch.device, *, skips_bad_steps: bool, partial: Optional[dict] = None,
                 explain: Callable[[], Optional[Exception]] = lambda: None):
        self.skips_bad_steps = skips_bad_steps  # fp16 with a GradScaler
        self.explain = explain  # when the run diverged: an error naming a cause outside training, or None
        self.sum = torch.zeros((), device=device)
        self.count = torch.zeros((), device=device)
        if partial:  # resumed inside the epoch: the part of it that ran before the stop
            self.sum += partial["sum"]
            self.count += partial["count"]

    def add(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss)
        self.sum += torch.where(finite, loss.float(), 0.0)
        self.count += finite

    def stop_if_diverged(self, done: int, *, epoch: int, step: int) -> None:
        """Without a GradScaler, fewer finite losses than the `done` batches (on every rank) ends the run."""
        if self.skips_bad_steps:
            return  # fp16: the GradScaler skips those steps and lowers its scale
        if float(distributed.all_reduce_sum(self.count.clone())) < done * distributed.world_size():
            raise self.explain() or DivergenceError(diverged_message(epoch, step))

    def partial(self) -> dict:
        """The epoch so far, averaged over ranks (saved with a checkpoint taken inside the epoch)."""
        world = distributed.world_size()
        return {"sum": float(distributed.all_reduce_sum(self.sum.clone())) / world,
                "count": float(distributed.all_reduce_sum(self.count.clone())) / world}

    def epoch_loss(self, steps: int, *, epoch: int) -> tuple[float, int]:
        """(mean finite loss over all ranks, steps skipped) at the end of an epoch of `steps` steps."""
        count = float(distributed.all_reduce_sum(self.count))
        if count == 0:
            raise self.explain() or DivergenceError(
                f"every loss of epoch {epoch} was inf/NaN (all fp16 steps skipped); try train.precision=bf16, "
                "a lower optim.lr or optim.grad_clip=1.0 (the last good checkpoint is kept)"
            )
        skipped = round(steps * distributed.world_size() - count)
        return float(distributed.all_reduce_sum(self.sum)) / count, skipped
