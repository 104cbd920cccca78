"""The official-style baseline: training as the research codebases (CoOp/CoCoOp/KgCoOp/MaPLe/DePT
on Dassl) do it, kept runnable so every speed claim can be checked side by side (`--style official`).

What it does, per step, like that code:
  * fp16 weights, eager (no autocast, no compile, no fused kernels: attention through SDPA as
    PyTorch's nn.MultiheadAttention would);
  * the image encoder runs on every step's images at the step's batch size (the paper's 4);
    PromptSRC's frozen image encoder runs on them a second time, in the same step (its trainer's
    way), and its Gaussian prompt aggregation averages the epochs as its trainer does;
  * every class prompt goes through the text encoder at all 77 positions, every step and every
    evaluation batch (no truncation, no chunking);
  * images are decoded by PIL and augmented by torchvision transforms on the CPU per step, in a
    DataLoader (Dassl's RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize).
One deliberate difference: what trains stays fp32 (cast to fp16 where used), because the research
code's fp16 master weights are a known source of NaNs; the arithmetic and memory traffic of the
forward and backward are those of fp16 training all the same.

The step is fastprompt's own `train_step` (without autocast or loss scaling), and whole runs go
through the same protocol code as fastprompt's path (`OfficialSession`): the two styles differ only
in what is listed above.
"""
from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from .clip import ClipBundle, load_clip
from .config import Config
from .data import eval_loader
from .fast_paths import configure_text
from .methods import build_model
from .methods.gpa import GaussianPromptAggregation
from .protocols import Say, Session
from .training import Precision, build_optimizer, set_epoch_lr, train_step

__all__ = ["official_clip", "build_official_model", "train_transform", "CpuAugmentDataset", "official_train_loader",
           "official_batches", "evaluate_official", "OfficialSession"]


def official_clip(name: str, pretrained: Optional[str], device) -> ClipBundle:
    """The frozen CLIP in fp16, as the research code's `clip_model.half()`."""
    return load_clip(name, pretrained, dtype=torch.float16, device=device)


def build_official_model(method: str, clip: ClipBundle, classnames: Sequence[str], **options) -> nn.Module:
    model = build_model(method, clip, list(classnames), **options)
    configure_text(model, chunk_size=None, truncate=False)  # all 77 positions, all classes at once
    return model


def train_transform(clip: ClipBundle, scale=(0.08, 1.0)) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(clip.image_size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(clip.mean, clip.std),
    ])


class CpuAugmentDataset(Dataset):
    """Encoded images (file paths or in-memory JPEG/PNG bytes) decoded and augmented per access."""

    def __init__(self, images: Sequence, labels: Sequence[int], transform: Callable):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = list(images), [int(y) for y in labels], transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        item = self.images[i]
        with Image.open(io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item) as img:
            return self.transform(img.convert("RGB")), self.labels[i]


def official_train_loader(dataset: Dataset, *, batch_size: int, num_workers: int, seed: int) -> DataLoader:
    """Shuffled batches, the last partial one dropped (Dassl's train loader)."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers,
                      generator=gen, pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)


def official_batches(loader: DataLoader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of the loader's batches on the device, images in fp16 (the weights' dtype)."""
    for images, labels in loader:
        yield images.to(device, non_blocking=True).half(), labels.to(device, non_blocking=True)


@torch.no_grad()
def evaluate_official(model: nn.Module, loader, device: torch.device) -> float:
    """Top-1 accuracy (%): every batch runs the image encoder and re-encodes every class prompt."""
    model.eval()
    correct = seen = 0
    for images, labels in loader:
        logits = model(images.to(device, non_blocking=True).half()).logits
        correct += int((logits.argmax(dim=-1).cpu() == labels).sum())
        seen += labels.numel()
    return 100.0 * correct / max(seen, 1)


class OfficialSession(Session):
    """The protocols run the official way (see the module docstring): an fp16 CLIP whatever
    model.dtype says, all 77 text positions, a CPU DataLoader with torchvision augmentation and the
    image encoder on every step, every class prompt encoded again for every evaluation batch.
    It exists to be timed: it writes results but no checkpoints (it cannot resume or be evaluated
    again)."""

    @staticmethod
    def load_backbone(cfg: Config, device: torch.device, say: Say) -> ClipBundle:
        say(f"loading CLIP {cfg.model.name} in fp16 (weights: {cfg.model.pretrained or 'random init'}) on {device}")
        return official_clip(cfg.model.name, cfg.model.pretrained, device)

    def build_model(self, classnames: list[str], seed: int) -> nn.Module:
        model = super().build_model(classnames, seed)
        configure_text(model, chunk_size=None, truncate=False)  # all 77 positions, all classes at once
        return model

    def train_model(self, model: nn.Module, train_samples: list, seed_dir: Path, seed: int) -> dict:
        cfg = self.cfg
        data = CpuAugmentDataset([s.path for s in train_samples], [s.label for s in train_samples],
                                 train_transform(self.clip, cfg.data.crop_scale))
        loader = official_train_loader(data, batch_size=min(cfg.train.batch_size, len(data)),
                                       num_workers=cfg.train.num_workers, seed=seed)
        optimizer = build_optimizer(model, cfg.optim)
        eager = Precision("fp32", self.device)  # no autocast, no loss scaling: the fp16 is in the weights
        gpa = GaussianPromptAggregation.for_model(model, cfg.train.epochs)  # PromptSRC's, as its trainer does
        model.train()
        steps, start = 0, time.perf_counter()
        for epoch in range(cfg.train.epochs):
            set_epoch_lr(optimizer, epoch, epochs=cfg.train.epochs, cfg=cfg.optim)
            for images, labels in official_batches(loader, self.device):
                train_step(model, images, labels, optimizer, eager)
                steps += 1
            if gpa is not None:
                gpa.accumulate(model.state_dict(), epoch + 1)
        if gpa is not None:
            gpa.apply(model)
        seconds = time.perf_counter() - start
        return {"steps": steps, "seconds": round(seconds, 3),
                "images_per_s": round(steps * loader.batch_size / max(seconds, 1e-9), 2)}

    def accuracy(self, model: nn.Module, samples: list, *, desc: str = "eval") -> tuple[float, float]:
        cfg, clip = self.cfg, self.clip
        loader = eval_loader(samples, image_size=clip.image_size, mean=clip.mean, std=clip.std,
                             batch_size=cfg.train.eval_batch_size, num_workers=cfg.train.num_workers,
                             allow_corrupt=cfg.data.allow_corrupt, pin_memory=self.device.type == "cuda")
        start = time.perf_counter()
        acc = evaluate_official(model, loader, self.device)
        return acc, len(samples) / max(time.perf_counter() - start, 1e-9)
