"""Where a run computes and how its randomness is seeded."""
from __future__ import annotations

import random

import numpy as np
import torch

from .. import distributed
from ..errors import ConfigError

__all__ = ["resolve_device", "seed_everything", "epoch_generator"]


def resolve_device(name: str) -> torch.device:
    """train.device ("auto", "cpu", "cuda", "cuda:N") as a device; under torchrun each rank's own GPU."""
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
    """A distinct, reproducible stream per (seed, epoch): resuming at an epoch needs no saved state."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + epoch)
    return gen
