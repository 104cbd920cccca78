"""The lean training loop: read it top to bottom.

One call, `fit`, trains a prompt-learning model on a few-shot set already decoded in memory:
seeded batch sampling, augmentation on the accelerator, mixed precision over fp32 master weights,
the paper's optimiser and schedule, gradient clipping, a progress bar with images/s and ETA, a log
file plus JSONL metrics, and atomic checkpoints from which `resume=True` continues to exactly the
result of an uninterrupted run.

Exact resume rests on one rule: every random draw of epoch `e` comes from generators seeded by
(seed, e), and the global torch RNG state is saved with each (end-of-epoch) checkpoint. A resumed
run therefore replays the same batches, the same crops and the same learning rates.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
from torch import nn

from . import distributed
from .checkpoint import (
    latest_checkpoint_dir,
    load_checkpoint,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    save_checkpoint,
)
from .compiled import compile_encoders
from .errors import CheckpointError
from .config import Config, ConfigError, OptimConfig, config_to_dict
from .errors import DivergenceError
from .features import EpochImageFeatures, uses_image_features

__all__ = [
    "TrainResult",
    "RunLogger",
    "fit",
    "resolve_device",
    "seed_everything",
    "autocast_context",
    "build_optimizer",
    "epoch_lr",
    "set_epoch_lr",
    "steps_per_epoch",
    "load_trained",
    "TrainingInterrupted",
]

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class BatchSource(Protocol):
    """What fit() reads training images from (fastprompt.data.TrainImageCache satisfies it)."""

    labels: torch.Tensor

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class TrainResult:
    epochs: int
    steps: int
    seconds: float  # wall time of the training steps (this process only when resumed)
    images_per_s: float
    epoch_losses: list[float] = field(default_factory=list)
    resumed_from_step: int = 0
    checkpoint: Optional[str] = None


# ----------------------------------------------------------------------------- small helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return distributed.device_for(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: '{name}' asked for, but no CUDA device is visible; use train.device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device: '{name}' but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return distributed.device_for(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    # Distinct, reproducible stream per (seed, epoch): resuming at an epoch needs no saved state.
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + epoch)
    return gen


def autocast_context(device: torch.device, precision: str):
    """Autocast for bf16/fp16; fp32 runs plain. Weights that train stay fp32 either way."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISION_DTYPES[precision])


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    # Dassl drops the last incomplete batch; a set smaller than one batch still gives one step.
    return max(1, num_samples // batch_size)


# ----------------------------------------------------------------------------- optimiser, schedule


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    classes = {
        k.lower(): v for k, v in vars(torch.optim).items()
        if isinstance(v, type) and issubclass(v, torch.optim.Optimizer) and v is not torch.optim.Optimizer
    }
    if name.lower() not in classes:
        import difflib

        close = difflib.get_close_matches(name.lower(), list(classes), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"optim.name: '{name}' is not a torch.optim optimiser{hint} (e.g. sgd, adamw)")
    return classes[name.lower()]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """One param group per model.parameter_groups() entry; the "head" group gets head_lr_mult x lr."""
    groups = model.parameter_groups() if hasattr(model, "parameter_groups") else {
        "prompt": [p for p in model.parameters() if p.requires_grad]
    }
    grouped = {id(p) for params in groups.values() for p in params}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in grouped]
    if missing:
        raise ValueError(f"trainable parameters outside every parameter group: {missing}")
    param_groups = []
    for name, params in groups.items():
        if not params:
            continue
        base_lr = cfg.lr * (cfg.head_lr_mult if name == "head" else 1.0)
        param_groups.append({"params": list(params), "name": name, "base_lr": base_lr, "lr": base_lr})
    cls = _optimizer_class(cfg.name)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {"lr": cfg.lr}
    if "weight_decay" in accepted:
        kwargs["weight_decay"] = cfg.weight_decay
    if "momentum" in accepted:
        kwargs["momentum"] = cfg.momentum
    for key, value in cfg.options.items():
        if key not in accepted:
            raise ConfigError(f"optim.options.{key}: {cls.__name__} takes no such argument")
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls(param_groups, **kwargs)


def epoch_lr(base_lr: float, epoch: int, *, epochs: int, cfg: OptimConfig) -> float:
    """Learning rate of 0-based `epoch`, as Dassl's ConstantWarmupScheduler over CosineAnnealingLR.

    Warm-up epochs run at the constant warmup_lr. Dassl steps the cosine successor (T_max = epochs)
    only once the warm-up is over, so the first epoch after it runs at the full lr and epoch e at
    cos(pi (e - warmup_epochs) / epochs): the warm-up delays the cosine, it does not replace its start.
    """
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    if cfg.scheduler == "constant":
        return base_lr
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / epochs))


def set_epoch_lr(optimizer: torch.optim.Optimizer, epoch: int, *, epochs: int, cfg: OptimConfig) -> None:
    for group in optimizer.param_groups:
        group["lr"] = epoch_lr(group["base_lr"], epoch, epochs=epochs, cfg=cfg)


# ----------------------------------------------------------------------------- logging


class RunLogger:
    """A run's log file, JSONL metrics and (when installed) TensorBoard, appended across resumes."""

    def __init__(self, run_dir: Path, *, name: str = "fastprompt"):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.log = logging.getLogger(f"{name}.{run_dir.resolve()}")
        self.log.setLevel(logging.INFO)
        self.log.propagate = False
        # Under torchrun only rank 0 writes the run's files; the other ranks' loggers are silent.
        self.enabled = distributed.is_main()
        self.tb = None
        if not self.enabled:
            self.log.disabled = True
            return
        if not self.log.handlers:
            handler = logging.FileHandler(run_dir / "train.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            self.log.addHandler(handler)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def info(self, msg: str) -> None:
        self.log.info(msg)

    def metrics(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time", "epoch"):
                    self.tb.add_scalar(f"{record.get('event', 'train')}/{key}", value, record["step"])

    def close(self) -> None:
        for handler in list(self.log.handlers):
            handler.close()
            self.log.removeHandler(handler)
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------- checkpoints


# Keys whose change would make a resumed run differ from the run it continues.
_RESUME_IRRELEVANT = {"output_dir", "train.progress", "train.num_workers", "train.log_every",
                      "train.device", "train.eval_batch_size", "train.checkpoint_every", "protocol.targets",
                      # one seed's (or shot count's) training does not depend on the others in the list
                      "data.seeds", "protocol.shots",
                      "train.feature_cache"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "options":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Keys `fastprompt eval` may change against the checkpoint it loads: the resume ones, where the data
# is, and what only evaluation reads. Any other change would evaluate a model the run did not train.
_EVAL_IRRELEVANT = _RESUME_IRRELEVANT | {"data.root", "data.cache_dir", "data.allow_corrupt",
                                         "train.text_chunk_size"}


def _config_changes(saved: dict, current: dict, ignored: set) -> str:
    """"key: old -> new, ..." for every key outside `ignored` that differs ("" when none does)."""
    a, b = _flat(saved), _flat(current)
    changed = [k for k in sorted(set(a) | set(b)) if k not in ignored and a.get(k) != b.get(k)]
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed)


def _check_resumable(saved: dict, current: dict, path: Path) -> None:
    diffs = _config_changes(saved, current, _RESUME_IRRELEVANT)
    if diffs:
        raise ConfigError(
            f"cannot resume from {path}: the config changed ({diffs}). Restore those values, "
            "or start a fresh run in a new output_dir"
        )


def _check_evaluable(saved: dict, current: dict, path: Path) -> None:
    diffs = _config_changes(saved, current, _EVAL_IRRELEVANT)
    if diffs:
        raise ConfigError(
            f"cannot evaluate {path} with this config: it was trained with other values ({diffs}). "
            "Drop those overrides (eval may change only "
            + ", ".join(sorted(_EVAL_IRRELEVANT - {"output_dir"})) + "), or train a new run with them"
        )


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


# ----------------------------------------------------------------------------- the loop


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
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    own_logger = logger is None
    logger = logger or RunLogger(run_dir)
    tcfg, ocfg = cfg.train, cfg.optim
    device = resolve_device(tcfg.device)
    config_dict = config_to_dict(cfg)

    # Master weights: whatever the frozen backbone's dtype, what trains is fp32.
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    num_samples = len(source.labels)
    bs = min(tcfg.batch_size, num_samples)
    per_epoch = steps_per_epoch(num_samples, bs)
    total_steps = per_epoch * tcfg.epochs
    if not trainable:
        logger.info("no trainable parameters (zero-shot method): skipping training")
        return TrainResult(epochs=0, steps=0, seconds=0.0, images_per_s=0.0)

    optimizer = build_optimizer(model, ocfg)
    scaler = torch.amp.GradScaler(device.type) if tcfg.precision == "fp16" else None
    part = distributed.local_slice(bs)  # this rank's share of each global batch (all of it in one process)
    # DDP over the trainables only; compile the forward only; state_dict()/parameters stay on `model`.
    wrapped = distributed.wrap_ddp(model, device)
    if tcfg.compile:  # the encoders' trunks, class-dependent sizes dynamic: no recompiles base -> new
        compile_encoders(model)
    forward = wrapped
    # Unprompted image encoders (CoOp, CoCoOp, KgCoOp, +DePT): each epoch's views are encoded in large
    # no-grad batches and the steps run forward_features (fastprompt.features; same views, same result).
    # DDP syncs gradients through the wrapper's forward only, so distributed runs keep the plain path.
    precompute = tcfg.precompute_features and uses_image_features(model) and not distributed.is_distributed()
    if precompute:
        forward = model.forward_features

    start_epoch, step, epoch_losses, resumed_from = 0, 0, [], 0
    skip_batches, partial, aug_state = 0, None, None
    if resume and latest_checkpoint_dir(ckpt_root) is not None:
        ckpt = load_checkpoint(ckpt_root)
        _check_resumable(ckpt.meta["config"], config_dict, ckpt.path)
        model.load_state_dict(ckpt.model_state)
        optimizer.load_state_dict(optimizer_state_from_flat(ckpt.trainer_tensors, ckpt.meta["optimizer"]))
        if scaler is not None and ckpt.meta.get("scaler"):
            scaler.load_state_dict(ckpt.meta["scaler"])
        _restore_rng(ckpt.trainer_tensors)
        start_epoch, step = ckpt.meta["epoch"], ckpt.meta["step"]
        epoch_losses = list(ckpt.meta.get("epoch_losses", []))
        # A checkpoint written on SIGTERM/SIGINT sits inside an epoch: skip the batches it had done.
        skip_batches = int(ckpt.meta.get("batch_in_epoch", 0))
        if skip_batches:
            partial = ckpt.meta["partial_loss"]
            aug_state = ckpt.trainer_tensors["rng.aug"]
        resumed_from = step
        logger.info(f"resumed from {ckpt.path} at epoch {start_epoch}, step {step}")

    logger.info(
        f"training {sum(p.numel() for p in trainable):,} parameters on {num_samples} images: "
        f"{tcfg.epochs} epochs x {per_epoch} steps, batch {bs}"
        + (f" ({part.stop - part.start} per process x {distributed.world_size()})" if distributed.is_distributed() else "")
        + f", {tcfg.precision}, device {device}"
    )
    progress = _progress(tcfg.progress and distributed.is_main(), total=total_steps * bs, initial=step * bs,
                         desc=f"train seed {seed}")
    model.train()
    t0, images_seen = time.perf_counter(), 0
    last_path: Optional[Path] = None
    save = _Saver(ckpt_root, model, optimizer, scaler, config_dict, seed)
    with _StopSignals() as stop:
        for epoch in range(start_epoch, tcfg.epochs):
            set_epoch_lr(optimizer, epoch, epochs=tcfg.epochs, cfg=ocfg)
            order = torch.randperm(num_samples, generator=epoch_generator(seed, epoch, torch.device("cpu")))
            aug_gen = epoch_generator(seed, epoch, device)
            # The sum of the finite losses and their count (this rank); steps minus count = inf/NaN losses.
            loss_sum = torch.zeros((), device=device)
            good = torch.zeros((), device=device)
            first = 0
            if epoch == start_epoch and skip_batches:
                first = skip_batches
                aug_gen.set_state(aug_state)
                loss_sum += partial["sum"]
                good += partial["count"]
            features = EpochImageFeatures(
                model, source, augment, order, batch_size=bs, steps=per_epoch, first=first, part=part,
                steps_per_chunk=max(1, tcfg.feature_batch_size // bs), device=device, generator=aug_gen,
                autocast=lambda: autocast_context(device, tcfg.precision), to_device=_to_device,
            ) if precompute else None
            feature_batches = iter(features) if precompute else None
            for i in range(first, per_epoch):
                if feature_batches is not None:
                    images, labels = next(feature_batches)  # image features, in fact
                else:
                    images, labels = source.batch(order[i * bs : (i + 1) * bs])
                    # Every rank augments the whole global batch (same generator, same draws as one
                    # process) and keeps its slice: cheap next to the forward, and exact.
                    images = augment(_to_device(images, device), generator=aug_gen)[part]
                    labels = labels.to(device, non_blocking=True)[part]
                try:
                    with autocast_context(device, tcfg.precision):
                        loss = forward(images, labels).loss
                except (ValueError, RuntimeError) as exc:
                    # A value check inside the model (e.g. the CAT head's finite-features check) can
                    # be the first to see weights that diverged: report the cause, not the symptom.
                    weights_bad = not all(bool(torch.isfinite(p).all()) for p in trainable)
                    if weights_bad or (step > resumed_from and "NaN" in str(exc)):
                        raise DivergenceError(f"{_diverged_message(epoch, step)} [the model said: {exc}]") from exc
                    raise
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                else:
                    loss.backward()
                if ocfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(trainable, ocfg.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)  # skips the update when a gradient is inf/NaN
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                finite = torch.isfinite(loss.detach())
                loss_sum += torch.where(finite, loss.detach().float(), 0.0)
                good += finite
                step += 1
                images_seen += bs
                progress.update(bs)
                if step % tcfg.log_every == 0:
                    _stop_if_diverged(good, i + 1, scaler, epoch, step)
                    step_loss = float(distributed.all_reduce_sum(loss.detach().float().clone())) / distributed.world_size()
                    rate = images_seen / max(time.perf_counter() - t0, 1e-9)
                    record = {"event": "train", "seed": seed, "epoch": epoch, "step": step,
                              "loss": step_loss, "lr": optimizer.param_groups[0]["lr"], "images_per_s": rate}
                    progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    logger.metrics(record)
                if i + 1 < per_epoch and distributed.any_rank(stop.requested is not None):
                    # SIGTERM/SIGINT inside an epoch: checkpoint this exact point, then leave.
                    _stop_if_diverged(good, i + 1, scaler, epoch, step)
                    world = distributed.world_size()
                    partial = {"sum": float(distributed.all_reduce_sum(loss_sum.clone())) / world,
                               "count": float(distributed.all_reduce_sum(good.clone())) / world}
                    path = save(epoch, step, epoch_losses, batch_in_epoch=i + 1, partial_loss=partial,
                                aug_state=features.generator_state_after(i) if features else aug_gen.get_state())
                    raise TrainingInterrupted(stop.requested or signal.SIGTERM, path)
            _stop_if_diverged(good, per_epoch, scaler, epoch, step)
            count = float(distributed.all_reduce_sum(good))
            if count == 0:
                raise DivergenceError(
                    f"every loss of epoch {epoch} was inf/NaN (all fp16 steps skipped); try train.precision=bf16, "
                    "a lower optim.lr or optim.grad_clip=1.0 (the last good checkpoint is kept)"
                )
            epoch_loss = float(distributed.all_reduce_sum(loss_sum)) / count
            skipped = round(per_epoch * distributed.world_size() - count)
            if skipped:
                logger.info(f"epoch {epoch + 1}: {skipped} fp16 step(s) with an inf/NaN loss were skipped by the GradScaler")
            epoch_losses.append(epoch_loss)
            logger.metrics({"event": "epoch", "seed": seed, "epoch": epoch, "step": step, "loss": epoch_loss,
                            "lr": optimizer.param_groups[0]["lr"], **({"skipped_steps": skipped} if skipped else {})})
            logger.info(f"epoch {epoch + 1}/{tcfg.epochs} loss {epoch_loss:.4f} lr {optimizer.param_groups[0]['lr']:.3e}")
            stopping = distributed.any_rank(stop.requested is not None)
            if (epoch + 1) % tcfg.checkpoint_every == 0 or epoch + 1 == tcfg.epochs or stopping:
                last_path = save(epoch + 1, step, epoch_losses)
            if stopping:
                raise TrainingInterrupted(stop.requested or signal.SIGTERM, last_path)
    progress.close()
    model.eval()
    seconds = time.perf_counter() - t0
    rate = images_seen / seconds if seconds > 0 and images_seen else 0.0
    logger.info(f"trained {step - resumed_from} steps in {seconds:.1f}s ({rate:.1f} images/s)")
    if own_logger:
        logger.close()
    if last_path is None:
        last_path = latest_checkpoint_dir(ckpt_root)
    return TrainResult(epochs=tcfg.epochs, steps=step, seconds=seconds, images_per_s=rate,
                       epoch_losses=epoch_losses, resumed_from_step=resumed_from,
                       checkpoint=str(last_path) if last_path else None)


def _to_device(images, device: torch.device):
    # The image cache returns one tensor, or a list when the decoded images differ in size.
    if isinstance(images, torch.Tensor):
        return images.to(device, non_blocking=True)
    return [im.to(device, non_blocking=True) for im in images]


class _Saver:
    """Writes the run's checkpoints: rank 0 writes, every rank waits until the files are in place."""

    def __init__(self, root, model, optimizer, scaler, config_dict, seed):
        self.root, self.model, self.optimizer, self.scaler = root, model, optimizer, scaler
        self.config_dict, self.seed = config_dict, seed

    def __call__(self, epoch: int, step: int, epoch_losses: list, *, batch_in_epoch: int = 0,
                 partial_loss: Optional[dict] = None, aug_state: Optional[torch.Tensor] = None) -> Path:
        # Ranks are in lock-step (DDP's all-reduce); the barrier after the write keeps any rank from
        # finishing, or being killed with the job, before rank 0's checkpoint is complete.
        distributed.barrier()
        path = Path(self.root) / f"step-{step:08d}"
        if distributed.is_main():
            optim_tensors, optim_rest = optimizer_state_to_flat(self.optimizer.state_dict())
            extra = {"rng.aug": aug_state} if aug_state is not None else {}
            meta = {
                "format": "fastprompt-checkpoint-1",
                "epoch": epoch,  # epochs completed
                "batch_in_epoch": batch_in_epoch,  # > 0: saved on a signal inside epoch `epoch`
                "partial_loss": partial_loss,
                "seed": self.seed,
                "epoch_losses": epoch_losses,
                "optimizer": optim_rest,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "config": self.config_dict,
                "world_size": distributed.world_size(),
                "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
            }
            path = save_checkpoint(self.root, step=step, model_state=self.model.state_dict(),
                                   trainer_tensors={**optim_tensors, **_rng_tensors(), **extra}, meta=meta)
        distributed.barrier()
        return path


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT reached a training run; a checkpoint was written at `checkpoint` first."""

    def __init__(self, signum: int, checkpoint: Optional[Path]):
        self.signum, self.checkpoint = int(signum), checkpoint
        name = signal.Signals(self.signum).name
        super().__init__(f"{name} received: saved checkpoint {checkpoint}; rerun the same command with --resume "
                         "to continue exactly where it stopped")


class _StopSignals:
    """While training, SIGTERM and SIGINT ask for a stop at the next step instead of killing the run.

    The loop then checkpoints and raises TrainingInterrupted. A second SIGINT (Ctrl-C twice) stops
    at once, as Ctrl-C normally does. Only the main thread may install handlers; elsewhere (a
    training thread in a notebook) signals keep their usual meaning.
    """

    def __init__(self):
        self.requested: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _stop_if_diverged(good: torch.Tensor, done: int, scaler, epoch: int, step: int) -> None:
    """Without a GradScaler an inf/NaN loss ends the run before anything is saved from it."""
    if scaler is not None:
        return  # fp16: the GradScaler skips those steps and lowers its scale
    # `done` batches of this epoch ran on every rank; fewer finite losses than that means inf/NaN.
    if float(distributed.all_reduce_sum(good.clone())) < done * distributed.world_size():
        raise DivergenceError(_diverged_message(epoch, step))


def _diverged_message(epoch: int, step: int) -> str:
    return (f"training diverged in epoch {epoch} (by step {step}): the loss or the trained weights became inf/NaN; "
            "the run stopped and the last good checkpoint is kept. Try a lower optim.lr, optim.grad_clip=1.0, "
            "or train.precision=bf16 instead of fp16 (with changed settings, train into a new output_dir)")


def _progress(enabled: bool, *, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    # unit "img": tqdm's rate is then images/s and its ETA covers the whole run. Bars only on a
    # terminal: in a CI log they are noise (the log file and metrics.jsonl carry the numbers).
    return tqdm(total=total, initial=initial, desc=desc, unit="img", disable=not (enabled and sys.stderr.isatty()),
                dynamic_ncols=True, leave=False, file=sys.stderr)


def load_trained(model: nn.Module, run_dir: str | Path, config: Optional[dict] = None) -> dict:
    """Load the newest checkpoint of run_dir into model; returns its meta. For `fastprompt eval`.

    With `config` (the current config as a dict), a checkpoint trained with other values of keys
    that shape or train the model is refused with a ConfigError naming them, before loading."""
    root = Path(run_dir) / "checkpoints"
    if latest_checkpoint_dir(root) is None:
        raise CheckpointError(f"no checkpoint under {root}; train first (fastprompt train CONFIG)")
    ckpt = load_checkpoint(root)
    if config is not None and isinstance(ckpt.meta.get("config"), dict):
        _check_evaluable(ckpt.meta["config"], config, root)
    model.load_state_dict(ckpt.model_state)
    return ckpt.meta
