"""A training run's state in its checkpoints: written at epoch ends (and on a stop signal inside an
epoch), read back by `--resume` so that the run ends exactly as an uninterrupted one would.

Exact resume rests on one rule: every random draw of epoch `e` comes from generators seeded by
(seed, e) (`epoch_generator`), and the global torch RNG state is saved with each checkpoint. A
checkpoint taken inside an epoch also holds the augmentation generator's state and the epoch's loss
tally so far, so the resumed run skips the batches already done and draws the same views after them.
A run with Gaussian prompt aggregation (PromptSRC) also saves the aggregator's running sum
(trainer tensors `gpa.<name>`, its progress in meta["gpa"]), so a resumed run ends with the same
aggregate.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .. import distributed
from ..checkpoint import (latest_checkpoint_dir, load_checkpoint, optimizer_state_from_flat, optimizer_state_to_flat,
                          save_checkpoint)
from ..errors import CheckpointError
from ..methods.gpa import GaussianPromptAggregation
from ..run_folder import check_resumable
from .precision import Precision

__all__ = ["ResumePoint", "resume_point", "CheckpointWriter"]

FORMAT = "fastprompt-checkpoint-1"
GPA_PREFIX = "gpa."


@dataclass
class ResumePoint:
    """Where a run stands: `epoch` epochs and `step` steps done; `batch_in_epoch` > 0 when it stopped
    inside epoch `epoch` (then `partial_loss` and `aug_state` describe that epoch so far)."""

    epoch: int = 0
    step: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    batch_in_epoch: int = 0
    partial_loss: Optional[dict] = None
    aug_state: Optional[torch.Tensor] = None
    path: Optional[Path] = None


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    return tensors


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _gpa_tensors(gpa: Optional[GaussianPromptAggregation]) -> tuple[dict[str, torch.Tensor], Optional[dict]]:
    if gpa is None:
        return {}, None
    state = gpa.state_dict()
    return {GPA_PREFIX + k: v for k, v in state["tensors"].items()}, state["meta"]


def _restore_gpa(gpa: Optional[GaussianPromptAggregation], tensors: dict[str, torch.Tensor], meta: Optional[dict],
                 path: Path) -> None:
    if gpa is None:
        return
    if meta is None:
        raise CheckpointError(f"{path} holds no Gaussian prompt aggregation state, which this run needs to resume "
                              "exactly; train it from the start into a new output_dir (or without --resume)")
    sums = {k[len(GPA_PREFIX):]: v for k, v in tensors.items() if k.startswith(GPA_PREFIX)}
    try:
        gpa.load_state_dict({"meta": meta, "tensors": sums})
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: its Gaussian prompt aggregation state cannot be resumed ({exc})") from None


def resume_point(root: Path, model: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
                 config: dict, gpa: Optional[GaussianPromptAggregation] = None) -> Optional[ResumePoint]:
    """Load the newest checkpoint under `root` into model, optimizer, loss scaler, RNGs and `gpa`;
    None when there is none. A checkpoint trained with another config (keys that shape training) is
    refused with a ConfigError naming the changed keys."""
    if latest_checkpoint_dir(root) is None:
        return None
    ckpt = load_checkpoint(root)
    check_resumable(ckpt.meta["config"], config, ckpt.path)
    model.load_state_dict(ckpt.model_state)
    optimizer.load_state_dict(optimizer_state_from_flat(ckpt.trainer_tensors, ckpt.meta["optimizer"]))
    precision.load_state_dict(ckpt.meta.get("scaler"))
    _restore_rng(ckpt.trainer_tensors)
    _restore_gpa(gpa, ckpt.trainer_tensors, ckpt.meta.get("gpa"), ckpt.path)
    inside = int(ckpt.meta.get("batch_in_epoch", 0))
    return ResumePoint(epoch=ckpt.meta["epoch"], step=ckpt.meta["step"],
                       epoch_losses=list(ckpt.meta.get("epoch_losses", [])), batch_in_epoch=inside,
                       partial_loss=ckpt.meta["partial_loss"] if inside else None,
                       aug_state=ckpt.trainer_tensors["rng.aug"] if inside else None, path=ckpt.path)


class CheckpointWriter:
    """Writes the run's checkpoints: rank 0 writes, every rank waits until the files are in place.
    With `gpa`, its state as it stands goes into every checkpoint."""

    def __init__(self, root: Path, model: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
                 config: dict, seed: int, gpa: Optional[GaussianPromptAggregation] = None):
        self.root, self.model, self.optimizer, self.precision = root, model, optimizer, precision
        self.config, self.seed, self.gpa = config, seed, gpa

    def __call__(self, epoch: int, step: int, epoch_losses: list, *, batch_in_epoch: int = 0,
                 partial_loss: Optional[dict] = None, aug_state: Optional[torch.Tensor] = None) -> Path:
        # Ranks are in lock-step (DDP's all-reduce); the barrier after the write keeps any rank from
        # finishing, or being killed with the job, before rank 0's checkpoint is complete.
        distributed.barrier()
        path = Path(self.root) / f"step-{step:08d}"
        if distributed.is_main():
            optim_tensors, optim_rest = optimizer_state_to_flat(self.optimizer.state_dict())
            extra = {"rng.aug": aug_state} if aug_state is not None else {}
            gpa_tensors, gpa_meta = _gpa_tensors(self.gpa)
            meta = {
                "format": FORMAT,
                "epoch": epoch,  # epochs completed
                "batch_in_epoch": batch_in_epoch,  # > 0: saved on a signal inside epoch `epoch`
                "partial_loss": partial_loss,
                "seed": self.seed,
                "epoch_losses": epoch_losses,
                "optimizer": optim_rest,
                "scaler": self.precision.state_dict(),
                "config": self.config,
                "world_size": distributed.world_size(),
                **({"gpa": gpa_meta} if gpa_meta is not None else {}),
                "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
            }
            path = save_checkpoint(self.root, step=step, model_state=self.model.state_dict(),
                                   trainer_tensors={**optim_tensors, **_rng_tensors(), **extra, **gpa_tensors}, meta=meta)
        distributed.barrier()
        return path
