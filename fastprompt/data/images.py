"""Finding and decoding image files: the file-level helpers every layout and loader shares."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DatasetError

# Extensions PIL decodes that image datasets actually use; compared lower-case.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})

# What PIL raises for a missing, truncated or otherwise undecodable file.
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike) -> list[str]:
    """Absolute paths of the image files directly inside `folder`, sorted by name (deterministic)."""
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.is_file() and is_image_file(e.name))
    base = os.path.abspath(folder)
    return [os.path.join(base, n) for n in names]


def list_subfolders(folder: str | os.PathLike) -> list[str]:
    """Names of the visible sub-folders of `folder`, sorted."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def require_dir(path: Path, what: str, layout: str) -> None:
    """Raise a DatasetError naming `path` and showing the expected `layout` if it is not a folder."""
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "does not exist"
        raise DatasetError(f"{what} {str(path)!r} {state}. Expected layout (docs/datasets.md):\n{layout}")


def require_file(path: Path, what: str, layout: str) -> None:
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        raise DatasetError(f"{what} {str(path)!r} {state}. Expected layout (docs/datasets.md):\n{layout}")


# 16-bit greyscale modes: PIL's convert("RGB") clips them at 255 (a 16-bit PNG becomes black and
# white), so they are scaled to 8 bits here. 16-bit RGB PNGs already decode to 8 bits correctly.
_SIXTEEN_BIT_GREY = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def _grey16_to_rgb(img: Image.Image) -> Image.Image:
    values = np.asarray(img, dtype=np.float32)
    grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255
    return Image.fromarray(grey).convert("RGB")  # a 2-D uint8 array is mode "L"


def load_rgb(path: str, draft_short_side: int | None = None) -> Image.Image:
    """Decode `path` fully into an RGB PIL image; DatasetError naming the file if that fails.

    `draft_short_side` lets the JPEG decoder skip detail the caller will resize away (it decodes at
    1/2, 1/4 or 1/8 scale while keeping the short side at least this long): a large speed-up when
    caching big photos at short side 256, and exact for everything else.
    """
    try:
        with Image.open(path) as img:
            if draft_short_side is not None and img.format == "JPEG":
                w, h = img.size
                scale = draft_short_side / min(w, h)
                if scale < 1:
                    img.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))
            if img.mode in _SIXTEEN_BIT_GREY or (img.mode == "I" and img.format == "PNG"):
                return _grey16_to_rgb(img)
            return img.convert("RGB")  # convert() forces the full decode, so errors surface here
    except FileNotFoundError:
        raise DatasetError(f"image file {path!r} does not exist" "; replace or remove the file, or set data.allow_corrupt=true to skip unreadable images (they are logged)") from None
    except DECODE_ERRORS as exc:
        raise DatasetError(f"cannot decode image {path!r}: {type(exc).__name__}: {exc}" "; replace or remove the file, or set data.allow_corrupt=true to skip unreadable images (they are logged)") from exc
