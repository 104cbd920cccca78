"""The official-style baseline: training as the research codebases (CoOp/CoCoOp/KgCoOp/MaPLe/DePT
on Dassl) do it, kept runnable so every speed claim can be checked side by side (`--style official`).

What it does, per step, like that code:
  * fp16 weights, eager (no autocast, no compile, no fused kernels: attention through SDPA as
    PyTorch's nn.MultiheadAttention would);
  * the image encoder runs on every step's images at the step's batch size (the paper's 4);
  * every class prompt goes through the text encoder at all 77 positions, every step and every
    evaluation batch (no truncation, no chunking);
  * images are decoded by PIL and augmented by torchvision transforms on the CPU per step, in a
    DataLoader (Dassl's RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize).
One deliberate difference: what trains stays fp32 (cast to fp16 where used), because the research
code's fp16 master weights are a known source of NaNs; the arithmetic and memory traffic of the
forward and backward are those of fp16 training all the same.
"""
from __future__ import annotations

import io
from typing import Callable, Optional, Sequence

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from .clip import ClipBundle, load_clip
from .features import configure_text

__all__ = ["official_clip", "build_official_model", "train_transform", "CpuAugmentDataset", "official_train_loader",
           "official_step", "evaluate_official"]


def official_clip(name: str, pretrained: Optional[str], device) -> ClipBundle:
    """The frozen CLIP in fp16, as the research code's `clip_model.half()`."""
    return load_clip(name, pretrained, dtype=torch.float16, device=device)


def build_official_model(method: str, clip: ClipBundle, classnames: Sequence[str], **options) -> nn.Module:
    from .methods import build_model

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


def official_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                  device: torch.device) -> torch.Tensor:
    """One eager fp16 step: whole forward (image encoder included), backward, optimiser."""
    images = images.to(device, non_blocking=True).half()
    labels = labels.to(device, non_blocking=True)
    loss = model(images, labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


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
