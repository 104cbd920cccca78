"""The lean training loop: read `fit` top to bottom.

One call trains a prompt-learning model on a few-shot set already decoded in memory: seeded batch
sampling, augmentation on the accelerator (or precomputed image features where the image encoder
has no prompts), mixed precision over fp32 master weights, the paper's optimiser and schedule,
gradient clipping, DDP under torchrun, a progress bar with images/s and ETA, a log file plus JSONL
metrics, and atomic checkpoints from which `resume=True` continues to exactly the result of an
uninterrupted run. Each of those is its own small module in this package; `fit` puts them in order.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .. import distributed
from ..checkpoint import latest_checkpoint_dir
from ..compiled import compile_encoders
from ..config import Config, config_to_dict
from ..fast_paths import uses_frozen_image_features, uses_image_features
from ..methods.gpa import GaussianPromptAggregation
from ..run_folder import checkpoints_dir
from .batches import BatchSource, EpochBatches, FeatureEncoding, steps_per_epoch
from .device import epoch_generator, resolve_device
from .divergence import LossTally, diverged_error, nonfinite_input_error
from .optim import build_optimizer, set_epoch_lr
from .precision import Precision
from .run_log import RunLogger, progress_bar
from .signals import StopSignals
from .state import CheckpointWriter, ResumePoint, resume_point
from .step import step_forward, train_step

__all__ = ["TrainResult", "fit"]


@dataclass
class TrainResult:
    epochs: int
    steps: int
    seconds: float  # wall time of the training steps (this process only when resumed)
    images_per_s: float
    epoch_losses: list[float] = field(default_factory=list)
    resumed_from_step: int = 0
    checkpoint: Optional[str] = None


def fit(
    model: nn.Module,
    source: BatchSource,
    augment: Callable[..., torch.Tensor],
    cfg: Config,
    run_dir: str | Path,
    *,
    seed: int,
    resume: bool = False,
    logger: Optional[RunLogger] = None,
) -> TrainResult:
    """Train `model` on `source` for cfg.train.epochs epochs; checkpoints go to run_dir/checkpoints.

    model(images, labels) must return an object with `.loss`; model.state_dict() must hold only the
    trainable tensors. augment(uint8-or-float images, generator=...) returns normalised [B,3,S,S].
    """
    run_dir, tcfg = Path(run_dir), cfg.train
    device = resolve_device(tcfg.device)
    trainable = _master_weights(model)
    num_samples = len(source.labels)
    bs = min(tcfg.batch_size, num_samples)
    per_epoch = steps_per_epoch(num_samples, bs)
    with _logging_to(run_dir, logger) as log:
        if not trainable:
            log.info("no trainable parameters (zero-shot method): skipping training")
            return TrainResult(epochs=0, steps=0, seconds=0.0, images_per_s=0.0)
        optimizer = build_optimizer(model, cfg.optim)
        precision = Precision(tcfg.precision, device)
        part = distributed.local_slice(bs)  # this rank's share of each global batch (all of it in one process)
        forward, features = _forward_and_features(model, cfg, device, precision, bs)
        # PromptSRC's Gaussian prompt aggregation (None for other methods): a weighted sum of every
        # epoch's end state, whose result replaces the weights after the last epoch.
        gpa = GaussianPromptAggregation.for_model(model, tcfg.epochs)
        config, ckpt_root = config_to_dict(cfg), checkpoints_dir(run_dir)
        at = (resume_point(ckpt_root, model, optimizer, precision, config, gpa) if resume else None) or ResumePoint()
        if at.path is not None:
            log.info(f"resumed from {at.path} at epoch {at.epoch}, step {at.step}")
        log.info(f"training {sum(p.numel() for p in trainable):,} parameters on {num_samples} images: "
                 f"{tcfg.epochs} epochs x {per_epoch} steps, batch {bs}"
                 + (f" ({part.stop - part.start} per process x {distributed.world_size()})"
                    if distributed.is_distributed() else "") + f", {tcfg.precision}, device {device}")
        log.info(_feature_note(model, features, cfg.train.precompute_features, bs))
        if gpa is not None:
            log.info(f"Gaussian prompt aggregation: mean {gpa.mean:g}, std {gpa.std:g} over {tcfg.epochs} epochs")
        save = CheckpointWriter(ckpt_root, model, optimizer, precision, config, seed, gpa)
        progress = progress_bar(tcfg.progress, total=per_epoch * tcfg.epochs * bs, initial=at.step * bs,
                                desc=f"train seed {seed}")
        model.train()
        step, epoch_losses, last_path = at.step, at.epoch_losses, None
        t0, images_seen = time.perf_counter(), 0
        with StopSignals() as stop:
            for epoch in range(at.epoch, tcfg.epochs):
                set_epoch_lr(optimizer, epoch, epochs=tcfg.epochs, cfg=cfg.optim)
                order = torch.randperm(num_samples, generator=epoch_generator(seed, epoch, torch.device("cpu")))
                aug_gen = epoch_generator(seed, epoch, device)
                inside = epoch == at.epoch and at.batch_in_epoch > 0  # resumed inside this epoch
                if inside:
                    aug_gen.set_state(at.aug_state)
                tally = LossTally(device, skips_bad_steps=precision.skips_bad_steps,
                                  partial=at.partial_loss if inside else None,
                                  explain=lambda: nonfinite_input_error(source))
                first = at.batch_in_epoch if inside else 0
                batches = EpochBatches(source, augment, order, batch_size=bs, steps=per_epoch, first=first,
                                       part=part, device=device, generator=aug_gen, features=features)
                for i, (inputs, labels) in enumerate(batches, start=first):
                    try:
                        loss = train_step(forward, inputs, labels, optimizer, precision,
                                          grad_clip=cfg.optim.grad_clip, params=trainable)
                    except (ValueError, RuntimeError) as exc:
                        diverged = nonfinite_input_error(source) or \
                            diverged_error(exc, trainable, epoch=epoch, step=step, since_resume=step > at.step)
                        if diverged is None:
                            raise
                        raise diverged from exc
                    tally.add(loss)
                    step, images_seen = step + 1, images_seen + bs
                    progress.update(bs)
                    if step % tcfg.log_every == 0:
                        tally.stop_if_diverged(i + 1, epoch=epoch, step=step)
                        _log_step(log, progress, loss, optimizer, seed=seed, epoch=epoch, step=step,
                                  rate=images_seen / max(time.perf_counter() - t0, 1e-9))
                    if i + 1 < per_epoch and distributed.any_rank(stop.requested is not None):
                        # SIGTERM/SIGINT inside an epoch: checkpoint this exact point, then leave.
                        tally.stop_if_diverged(i + 1, epoch=epoch, step=step)
                        path = save(epoch, step, epoch_losses, batch_in_epoch=i + 1, partial_loss=tally.partial(),
                                    aug_state=batches.generator_state_after(i))
                        raise stop.interrupted(path)
                tally.stop_if_diverged(per_epoch, epoch=epoch, step=step)
                epoch_loss, skipped = tally.epoch_loss(per_epoch, epoch=epoch)
                epoch_losses.append(epoch_loss)
                _log_epoch(log, optimizer, epoch_loss, skipped, seed=seed, epoch=epoch, epochs=tcfg.epochs, step=step)
                if gpa is not None:
                    _aggregate(gpa, model, epoch + 1, log)
                stopping = distributed.any_rank(stop.requested is not None)
                if (epoch + 1) % tcfg.checkpoint_every == 0 or epoch + 1 == tcfg.epochs or stopping:
                    last_path = save(epoch + 1, step, epoch_losses)
                if stopping:
                    raise stop.interrupted(last_path)
        progress.close()
        model.eval()
        seconds = time.perf_counter() - t0
        rate = images_seen / seconds if seconds > 0 and images_seen else 0.0
        log.info(f"trained {step - at.step} steps in {seconds:.1f}s ({rate:.1f} images/s)")
    last_path = last_path or latest_checkpoint_dir(ckpt_root)
    return TrainResult(epochs=tcfg.epochs, steps=step, seconds=seconds, images_per_s=rate, epoch_losses=epoch_losses,
                       resumed_from_step=at.step, checkpoint=str(last_path) if last_path else None)


def _aggregate(gpa: GaussianPromptAggregation, model: nn.Module, epoch: int, log: RunLogger) -> None:
    """Add the state after 1-based `epoch`'s last step; after the last epoch load the aggregate, so
    that the checkpoint written next (model.safetensors) holds what is evaluated."""
    gpa.accumulate(model.state_dict(), epoch)
    if gpa.complete:
        gpa.apply(model)
        log.info(f"Gaussian prompt aggregation: the weights are now the average over {gpa.epochs} epochs "
                 f"(epoch weights peak {max(gpa.weights):.3f} at epoch {gpa.weights.index(max(gpa.weights)) + 1})")


def _master_weights(model: nn.Module) -> list[torch.Tensor]:
    """What trains, in fp32 whatever the frozen backbone's dtype."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    return trainable


def _forward_and_features(model: nn.Module, cfg: Config, device: torch.device, precision: Precision,
                          batch: int) -> tuple[Callable, Optional[FeatureEncoding]]:
    """The step's forward: DDP over the trainables (state_dict()/parameters stay on `model`), the
    encoders' trunks compiled on request (class-dependent sizes dynamic: no recompiles base -> new).
    With train.precompute_features, image features that need no gradient are encoded for many steps
    in one no-grad batch (same views, same result; `step_forward`): an unprompted image encoder's
    (CoOp, CoCoOp, KgCoOp, +DePT; those steps bypass the wrapper, so distributed runs keep the
    plain path) and PromptSRC's frozen-branch features (through the wrapper, distributed too)."""
    wrapped = distributed.wrap_ddp(model, device)
    if cfg.train.compile:
        compile_encoders(model)
    precompute = cfg.train.precompute_features
    return step_forward(model, wrapped, steps_per_chunk=max(1, cfg.train.feature_batch_size // batch),
                        autocast=precision.autocast, image_features=precompute and not distributed.is_distributed(),
                        frozen_image_features=precompute)


def _feature_note(model: nn.Module, features: Optional[FeatureEncoding], setting: bool, batch: int) -> str:
    """The train.log line saying where the steps' image features come from, and why."""
    why = f"train.precompute_features={str(setting).lower()}"
    if features is None:
        if not (uses_image_features(model) or uses_frozen_image_features(model)):
            return "image features: encoded in each step (the image encoder is trained: nothing to encode ahead)"
        if distributed.is_distributed() and uses_image_features(model):
            return "image features: encoded in each step (distributed runs step through the DDP wrapper)"
        return f"image features: encoded in each step ({why})"
    what = "frozen-branch image features" if features.keep_views else "image features"
    return f"{what}: encoded ahead in no-grad batches of {features.steps_per_chunk * batch} images ({why})"


@contextmanager
def _logging_to(run_dir: Path, logger: Optional[RunLogger]) -> Iterator[RunLogger]:
    """The caller's logger, or one of this run's own (closed at the end)."""
    if logger is not None:
        yield logger
        return
    own = RunLogger(run_dir)
    try:
        yield own
    finally:
        own.close()


def _log_step(log: RunLogger, progress, loss: torch.Tensor, optimizer, *, seed: int, epoch: int, step: int,
              rate: float) -> None:
    step_loss = float(distributed.all_reduce_sum(loss.float().clone())) / distributed.world_size()
    lr = optimizer.param_groups[0]["lr"]
    progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
    log.metrics({"event": "train", "seed": seed, "epoch": epoch, "step": step, "loss": step_loss, "lr": lr,
                 "images_per_s": rate})


def _log_epoch(log: RunLogger, optimizer, epoch_loss: float, skipped: int, *, seed: int, epoch: int, epochs: int,
               step: int) -> None:
    lr = optimizer.param_groups[0]["lr"]
    if skipped:
        log.info(f"epoch {epoch + 1}: {skipped} fp16 step(s) with an inf/NaN loss were skipped by the GradScaler")
    log.metrics({"event": "epoch", "seed": seed, "epoch": epoch, "step": step, "loss": epoch_loss, "lr": lr,
                 **({"skipped_steps": skipped} if skipped else {})})
    log.info(f"epoch {epoch + 1}/{epochs} loss {epoch_loss:.4f} lr {lr:.3e}")
