"""Evaluation streams from disk with a DataLoader, with open_clip's validation preprocessing."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from .errors import DatasetError
from .images import load_rgb
from .splits import Sample

log = logging.getLogger(__name__)


def _to_rgb(img):  # a named function, so the transform pickles into spawned workers
    return img.convert("RGB")


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """PIL image -> float [3, S, S]: bicubic resize of the short side to S, centre crop, normalise.

    The same steps as open_clip's validation transform, except that the image is made RGB first
    (resizing a palette or greyscale image before conversion would interpolate indices / one band).
    """
    return T.Compose([
        T.Lambda(_to_rgb),
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(mean=mean, std=std),
    ])


class EvalDataset(Dataset):
    """Samples -> (image float [3, S, S], label). A corrupt image raises DatasetError naming the
    file, or, with allow_corrupt, yields (None, path) for the collate function to drop."""

    def __init__(self, samples: list[Sample], transform, allow_corrupt: bool):
        self.samples, self.transform, self.allow_corrupt = list(samples), transform, allow_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        try:
            img = load_rgb(s.path)
        except DatasetError:
            if not self.allow_corrupt:
                raise
            return None, s.path
        return self.transform(img), s.label


class _Collate:
    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, items):
        good = [(x, y) for x, y in items if x is not None]
        skipped = [y for x, y in items if x is None]
        if good:
            images = torch.stack([x for x, _ in good])
        else:
            images = torch.empty(0, 3, self.image_size, self.image_size)
        labels = torch.tensor([y for _, y in good], dtype=torch.int64)
        return images, labels, skipped


class EvalLoader(DataLoader):
    """A DataLoader yielding (images float [B, 3, S, S], labels int64 [B]).

    Skipped corrupt files (allow_corrupt=True) are collected in `skipped` during iteration and
    counted in one warning at its end; a batch that lost every image is not yielded.
    """

    skipped: list[str]

    def __iter__(self):
        self.skipped = []
        for images, labels, skipped in super().__iter__():
            self.skipped += skipped
            if labels.numel():
                yield images, labels
        if self.skipped:
            log.warning("skipped %d corrupt or unreadable evaluation images (first: %s)", len(self.skipped), self.skipped[0])


def eval_loader(samples: list[Sample], *, image_size: int, mean: Sequence[float], std: Sequence[float],
                batch_size: int, num_workers: int = 0, allow_corrupt: bool = False,
                pin_memory: bool = False) -> EvalLoader:
    """A loader over `samples` in their order (no shuffling), for accuracy evaluation."""
    if not samples:
        raise DatasetError("eval_loader got no samples: the split to evaluate is empty")
    dataset = EvalDataset(samples, eval_transform(image_size, mean, std), allow_corrupt)
    loader = EvalLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=_Collate(image_size), pin_memory=pin_memory,
        persistent_workers=False,
    )
    loader.skipped = []
    return loader
