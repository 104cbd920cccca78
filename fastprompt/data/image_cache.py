"""Few-shot training images decoded once and kept in memory, so epochs never touch the disk.

Memory: each image is kept as uint8 CHW at its aspect ratio with the short side at most
`short_side`. At 256 a 4:3 photo is 256x341x3 = 262 KB, so 16 shots x 1000 classes (ImageNet,
16k images) is about 4 GB, and the 11-dataset runs with 100-400 classes 0.4-1.7 GB. Keep large
caches in (pinned) CPU memory and move each batch; small ones can live on the GPU.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from .errors import DatasetError
from .images import load_rgb
from .splits import Sample

log = logging.getLogger(__name__)


def decode_resized(path: str, short_side: int) -> torch.Tensor:
    """Decode `path` as uint8 [3, H, W] with min(H, W) == min(original short side, `short_side`).

    Only ever shrinks (bicubic with antialiasing, PIL's resize): upsampling here would add memory
    and no information, the augmentation resamples from whatever resolution is kept.
    """
    img = load_rgb(path, draft_short_side=short_side)
    w, h = img.size
    if min(w, h) > short_side:
        scale = short_side / min(w, h)
        size = (short_side, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), short_side)
        img = img.resize(size, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


class TrainImageCache:
    """The training set decoded once: `images[i]` is uint8 [3, H_i, W_i], `labels` int64 [n].

    When every image has the same size they are stacked into one uint8 tensor [n, 3, H, W] and
    `batch` returns a tensor; otherwise `batch` returns a list of tensors (GpuAugment takes both).
    `device` is where the images live ("cuda" keeps them on the GPU) and where `batch` sends them;
    `pin_memory=True` pins a CPU cache so `batch(..., device="cuda")` copies asynchronously. With
    `max_device_bytes`, a cache larger than that stays in pinned CPU memory (ImageNet at 16 shots is
    ~4 GB) while `batch` still delivers to `device`. Corrupt or unreadable images raise
    DatasetError naming the file, unless `allow_corrupt=True`: then they are skipped, listed in
    `skipped` and counted in a logged warning. `num_workers > 0` decodes in that many threads
    (PIL releases the GIL while decoding and resizing).
    """

    def __init__(self, samples: list[Sample], *, short_side: int, device: str | torch.device = "cpu",
                 allow_corrupt: bool = False, num_workers: int = 0, pin_memory: bool = False,
                 max_device_bytes: int | None = None):
        if short_side < 1:
            raise ValueError(f"short_side must be positive, got {short_side}")
        if not samples:
            raise DatasetError("TrainImageCache got no samples: the training split is empty")
        self.device = torch.device(device)
        self.skipped: list[str] = []

        def decode(sample: Sample) -> torch.Tensor | None:
            try:
                return decode_resized(sample.path, short_side)
            except DatasetError:
                if not allow_corrupt:
                    raise
                return None

        if num_workers > 0:
            with ThreadPoolExecutor(max_workers=num_workers) as pool:
                decoded = list(pool.map(decode, samples))
        else:
            decoded = [decode(s) for s in samples]

        kept_images, kept_labels = [], []
        for sample, img in zip(samples, decoded):
            if img is None:
                self.skipped.append(sample.path)
            else:
                kept_images.append(img)
                kept_labels.append(sample.label)
        if self.skipped:
            log.warning("skipped %d corrupt or unreadable training images (first: %s)", len(self.skipped), self.skipped[0])
        if not kept_images:
            raise DatasetError(f"all {len(samples)} training images were unreadable (first: {self.skipped[0]})")

        storage = self.device
        total = sum(t.numel() for t in kept_images)
        if storage.type != "cpu" and max_device_bytes is not None and total > max_device_bytes:
            log.info("training images (%.1f GB) kept in pinned CPU memory, not on %s", total / 1e9, storage)
            storage, pin_memory = torch.device("cpu"), True
        pin = pin_memory and storage.type == "cpu" and torch.cuda.is_available()
        if len({tuple(t.shape) for t in kept_images}) == 1:
            stacked = torch.stack(kept_images)
            self.images: torch.Tensor | list[torch.Tensor] = stacked.pin_memory() if pin else stacked.to(storage)
        else:
            self.images = [t.pin_memory() if pin else t.to(storage) for t in kept_images]
        self.labels = torch.tensor(kept_labels, dtype=torch.int64, device=storage)

    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def nbytes(self) -> int:
        if isinstance(self.images, torch.Tensor):
            return self.images.numel()
        return sum(t.numel() for t in self.images)

    def batch(self, indices: torch.Tensor, device: str | torch.device | None = None
              ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
        """Images and labels [B] int64 at `indices` [B], on `device` (default: the cache's device)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        target = torch.device(device) if device is not None else self.device
        if isinstance(self.images, torch.Tensor):
            idx = indices.to(self.images.device)
            if self.images.is_pinned() and target.type != "cpu":
                # Gather into fresh pinned memory so the host-to-device copy is truly asynchronous.
                staged = torch.empty((idx.numel(), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=True)
                images: torch.Tensor | list[torch.Tensor] = torch.index_select(self.images, 0, idx, out=staged)
            else:
                images = self.images[idx]
            images = images.to(target, non_blocking=True)
        else:
            images = [self.images[i].to(target, non_blocking=True) for i in indices.tolist()]
        labels = self.labels[indices.to(self.labels.device)].to(target, non_blocking=True)
        return images, labels
