"""Synthetic inputs of realistic size for the benchmark: class names of real token length, smooth
random images at the decode cache's size, the same as JPEG files, and ImageFolder trees of them."""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import torch

__all__ = ["SHORT_SIDE_RATIO", "class_names", "synthetic_images", "synthetic_jpegs", "ImageSource",
           "write_synthetic_tree"]

SHORT_SIDE_RATIO = 8 / 7  # the decoded cache keeps images at 8/7 of the crop (256 for 224)


def class_names(count: int) -> list[str]:
    """Distinct class names of realistic token length (ImageNet's names, repeated with a suffix)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names = list(IMAGENET_CLASSNAMES)
    return [names[i % len(names)] + (f" {i // len(names)}" if i >= len(names) else "") for i in range(count)]


def synthetic_images(count: int, image_size: int, *, seed: int) -> torch.Tensor:
    """Smooth random uint8 images [count, 3, H, W] at the decode cache's size (short side 8/7 S, 4:3)."""
    h = math.ceil(image_size * SHORT_SIDE_RATIO)
    w = round(h * 4 / 3)
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, max(2, h // 16), max(2, w // 16), generator=g)
    img = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    img = img + 0.1 * torch.rand(count, 3, h, w, generator=g)
    return (img.clamp(0, 1) * 255).to(torch.uint8)


def synthetic_jpegs(count: int, image_size: int, *, seed: int) -> list[bytes]:
    """The same kind of images as JPEG files' bytes (quality 90), for the per-step CPU decoding."""
    from PIL import Image

    out = []
    for img in synthetic_images(count, image_size, seed=seed):
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class ImageSource:
    """In-memory uint8 images as fastprompt's TrainImageCache serves them (indices wrap around)."""

    def __init__(self, images: torch.Tensor, num_classes: int, seed: int):
        self.images = images
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (images.shape[0],), generator=g).to(images.device)

    def batch(self, indices: torch.Tensor):
        idx = indices.to(self.images.device) % self.images.shape[0]
        return self.images[idx], self.labels[idx]


# ----------------------------------------------------------------------------- one training step


def write_synthetic_tree(root: Path, classes: int, train_per_class: int, test_per_class: int, image_size: int,
                         *, distinct: int = 64) -> Path:
    """An ImageFolder tree (train/ and test/ per class) of JPEG files; `distinct` images hard-linked
    over and over, so writing 50k files takes seconds while every read still decodes a real JPEG."""
    pool = root / "_pool"
    pool.mkdir(parents=True, exist_ok=True)
    sources = []
    for i, data in enumerate(synthetic_jpegs(distinct, image_size, seed=7)):
        path = pool / f"{i}.jpg"
        path.write_bytes(data)
        sources.append(path)
    k = 0
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for c, name in enumerate(class_names(classes)):
            folder = root / split / f"{c:04d}_{name.replace(' ', '_').replace('/', '_')}"
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                target = folder / f"{j}.jpg"
                if not target.exists():
                    try:
                        os.link(sources[k % distinct], target)
                    except OSError:  # no hard links on this file system: a copy is fine
                        target.write_bytes(sources[k % distinct].read_bytes())
                k += 1
    (root / "classes.txt").write_text("\n".join(sorted(p.name for p in (root / "train").iterdir())) + "\n")
    return root

