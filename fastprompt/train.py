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
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
from torch import nn

from .checkpoint import (
    CheckpointError,
    latest_checkpoint_dir,
    load_checkpoint,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    save_checkpoint,
)
from .config import Config, ConfigError, OptimConfig, config_to_dict

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
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: '{name}' asked for, but no CUDA device is visible; use train.device=cpu")
    return device


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

    Warm-up epochs run at the constant warmup_lr; afterwards the cosine continues from where it
    would be at that epoch (T_max = epochs), so the warm-up replaces the cosine's first epochs.
    """
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    if cfg.scheduler == "constant":
        return base_lr
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / epochs))


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
        if not self.log.handlers:
            handler = logging.FileHandler(run_dir / "train.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            self.log.addHandler(handler)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def info(self, msg: str) -> None:
        self.log.info(msg)

    def metrics(self, record: dict) -> None:
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
                      "train.device", "train.eval_batch_size", "train.checkpoint_every", "protocol.targets"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "options":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_resumable(saved: dict, current: dict, path: Path) -> None:
    a, b = _flat(saved), _flat(current)
    changed = [k for k in sorted(set(a) | set(b)) if k not in _RESUME_IRRELEVANT and a.get(k) != b.get(k)]
    if changed:
        diffs = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed)
        raise ConfigError(
            f"cannot resume from {path}: the config changed ({diffs}). Restore those values, "
            "or start a fresh run in a new output_dir"
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
    # Compile the forward only; state_dict()/parameters stay on the original module.
    forward = torch.compile(model) if tcfg.compile else model

    start_epoch, step, epoch_losses, resumed_from = 0, 0, [], 0
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
        resumed_from = step
        logger.info(f"resumed from {ckpt.path} at epoch {start_epoch}, step {step}")

    logger.info(
        f"training {sum(p.numel() for p in trainable):,} parameters on {num_samples} images: "
        f"{tcfg.epochs} epochs x {per_epoch} steps, batch {bs}, {tcfg.precision}, device {device}"
    )
    progress = _progress(tcfg.progress, total=total_steps * bs, initial=step * bs, desc=f"train seed {seed}")
    model.train()
    t0, images_seen = time.perf_counter(), 0
    last_path: Optional[Path] = None
    for epoch in range(start_epoch, tcfg.epochs):
        set_epoch_lr(optimizer, epoch, epochs=tcfg.epochs, cfg=ocfg)
        order = torch.randperm(num_samples, generator=epoch_generator(seed, epoch, torch.device("cpu")))
        aug_gen = epoch_generator(seed, epoch, device)
        loss_sum = torch.zeros((), device=device)
        for i in range(per_epoch):
            images, labels = source.batch(order[i * bs : (i + 1) * bs])
            images = augment(_to_device(images, device), generator=aug_gen)
            labels = labels.to(device, non_blocking=True)
            with autocast_context(device, tcfg.precision):
                loss = forward(images, labels).loss
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            else:
                loss.backward()
            if ocfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(trainable, ocfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().float()
            step += 1
            images_seen += bs
            progress.update(bs)
            if step % tcfg.log_every == 0:
                rate = images_seen / max(time.perf_counter() - t0, 1e-9)
                record = {"event": "train", "seed": seed, "epoch": epoch, "step": step,
                          "loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"], "images_per_s": rate}
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                logger.metrics(record)
        epoch_loss = float(loss_sum) / per_epoch
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(
                f"loss became {epoch_loss} in epoch {epoch}; try a lower optim.lr, optim.grad_clip=1.0 "
                "or train.precision=bf16 (the last good checkpoint is kept)"
            )
        epoch_losses.append(epoch_loss)
        logger.metrics({"event": "epoch", "seed": seed, "epoch": epoch, "step": step, "loss": epoch_loss,
                        "lr": optimizer.param_groups[0]["lr"]})
        logger.info(f"epoch {epoch + 1}/{tcfg.epochs} loss {epoch_loss:.4f} lr {optimizer.param_groups[0]['lr']:.3e}")
        if (epoch + 1) % tcfg.checkpoint_every == 0 or epoch + 1 == tcfg.epochs:
            last_path = _save(ckpt_root, model, optimizer, scaler, config_dict, seed, epoch + 1, step, epoch_losses)
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


def _save(root, model, optimizer, scaler, config_dict, seed, epoch, step, epoch_losses) -> Path:
    optim_tensors, optim_rest = optimizer_state_to_flat(optimizer.state_dict())
    meta = {
        "format": "fastprompt-checkpoint-1",
        "epoch": epoch,
        "seed": seed,
        "epoch_losses": epoch_losses,
        "optimizer": optim_rest,
        "scheduler": {"kind": config_dict["optim"]["scheduler"], "next_epoch": epoch},
        "scaler": scaler.state_dict() if scaler is not None else None,
        "config": config_dict,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    }
    return save_checkpoint(root, step=step, model_state=model.state_dict(),
                           trainer_tensors={**optim_tensors, **_rng_tensors()}, meta=meta)


def _progress(enabled: bool, *, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    # unit "img": tqdm's rate is then images/s and its ETA covers the whole run. Bars only on a
    # terminal: in a CI log they are noise (the log file and metrics.jsonl carry the numbers).
    return tqdm(total=total, initial=initial, desc=desc, unit="img", disable=not (enabled and sys.stderr.isatty()),
                dynamic_ncols=True, leave=False, file=sys.stderr)


def load_trained(model: nn.Module, run_dir: str | Path) -> dict:
    """Load the newest checkpoint of run_dir into model; returns its meta. For `fastprompt eval`."""
    root = Path(run_dir) / "checkpoints"
    if latest_checkpoint_dir(root) is None:
        raise CheckpointError(f"no checkpoint under {root}; train first (fastprompt train CONFIG)")
    ckpt = load_checkpoint(root)
    model.load_state_dict(ckpt.model_state)
    return ckpt.meta
