"""Real images with no network: scikit-learn's bundled handwritten digits as an ImageFolder tree."""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DatasetError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MARKER = ".fastprompt_digits.json"
VAL_FRACTION, TEST_FRACTION = 0.2, 0.2


def write_digits_imagefolder(root: str | os.PathLike, *, image_size: int = 32) -> Path:
    """Write `sklearn.datasets.load_digits` (1,797 8x8 greyscale digits) as PNGs under `root`.

    Tree: root/{train,val,test}/{zero..nine}/<index>.png, each image upscaled (bicubic) to
    image_size x image_size, and root/classes.txt so that label i is digit i (base = zero..four). Split per class, deterministically: the class's images shuffled by
    `random.Random(digit)`, 20% to test, 20% to val, the rest (~108 per class) to train.
    The tree is written in a temporary sibling folder and renamed into place, and a marker file
    makes a second call with the same settings return at once. Returns `root` as a Path.
    """
    from sklearn.datasets import load_digits  # the one place the package needs scikit-learn

    root = Path(root).expanduser()
    settings = {"image_size": int(image_size), "version": 2}
    marker = root / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == settings:
                return root
        except (OSError, json.JSONDecodeError):
            pass
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not marker.is_file())):
        raise DatasetError(f"{str(root)!r} exists and is not an empty folder or an earlier digits tree; choose another path")

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)  # values 0..16 -> 0..255
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        for digit, name in enumerate(DIGIT_NAMES):
            idx = [int(i) for i in np.flatnonzero(digits.target == digit)]
            random.Random(digit).shuffle(idx)
            n_test, n_val = round(len(idx) * TEST_FRACTION), round(len(idx) * VAL_FRACTION)
            parts = {"test": idx[:n_test], "val": idx[n_test:n_test + n_val], "train": idx[n_test + n_val:]}
            for split, members in parts.items():
                folder = tmp / split / name
                folder.mkdir(parents=True)
                for i in members:
                    img = Image.fromarray(pixels[i], mode="L").resize((image_size, image_size), Image.Resampling.BICUBIC)
                    img.save(folder / f"{i:04d}.png")
        (tmp / "classes.txt").write_text("\n".join(DIGIT_NAMES) + "\n")  # labels 0..9 = zero..nine
        (tmp / MARKER).write_text(json.dumps(settings))
        if root.exists():
            shutil.rmtree(root)  # only an empty folder or our own earlier tree reaches here
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
