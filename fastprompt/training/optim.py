"""The optimiser and the learning-rate schedule (the papers' Dassl settings by default)."""
from __future__ import annotations

import difflib
import inspect
import math
from typing import Any

import torch
from torch import nn

from ..config import OptimConfig
from ..errors import ConfigError

__all__ = ["build_optimizer", "epoch_lr", "set_epoch_lr"]


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    classes = {
        k.lower(): v for k, v in vars(torch.optim).items()
        if isinstance(v, type) and issubclass(v, torch.optim.Optimizer) and v is not torch.optim.Optimizer
    }
    if name.lower() not in classes:
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
    try:
        return cls(param_groups, **kwargs)
    except (ValueError, TypeError) as exc:  # torch checks the values (betas in [0, 1), eps >= 0, ...)
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ConfigError(f"optim: torch.optim.{cls.__name__} refuses these settings ({given}): {exc}; fix "
                          "optim.options (or optim.lr, optim.momentum, optim.weight_decay)") from exc


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
