"""A plain ImageFolder tree for users' own data.

Two shapes are accepted under `root`:

* `root/train/<class>/*` with optional `root/val/<class>/*` and `root/test/<class>/*`: used as
  given (a missing val or test split is empty; a warning is logged for a missing test split).
* `root/<class>/*` (one level of class folders): split per class deterministically: the class's
  files sorted by name, shuffled by `random.Random("<folder name>")`, then the first 20% (rounded)
  go to test, the next 10% to val and the rest (at least one image) to train. The same files always
  give the same split on any machine.

Labels follow the sorted class-folder names, unless `root/classes.txt` lists the class folders one
per line: then that order defines the labels (it must name every class folder exactly once). A
class name is its folder name with underscores replaced by spaces.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path

from .errors import DatasetError
from .images import list_images, list_subfolders, require_dir
from .splits import DatasetSplits, Sample

log = logging.getLogger(__name__)

IMAGEFOLDER_LAYOUT = (
    "<root>/\n"
    "  train/<class name>/*.png|jpg     (one folder per class; '_' in a folder name reads as a space)\n"
    "  val/<class name>/*               (optional)\n"
    "  test/<class name>/*              (optional)\n"
    "or, to have fastprompt split it (70% train / 10% val / 20% test per class, deterministic):\n"
    "<root>/<class name>/*.png|jpg\n"
    "optional <root>/classes.txt: the class folder names, one per line, in label order"
)
CLASS_ORDER_FILE = "classes.txt"
FLAT_TEST_FRACTION = 0.2
FLAT_VAL_FRACTION = 0.1


def _classname(folder: str) -> str:
    return folder.replace("_", " ")


def _check_class_names(parent: Path, folders: list[str], warnings: list[str]) -> None:
    """Two folders whose class names are the same text (`hot_dog` and `hot dog`) would get the same
    prompt: refused. Names that differ only in case (`cat`, `Cat`) are a warning: most CLIP
    tokenizers lower-case, and then the models refuse them as identical prompts."""
    by_text, by_lower = {}, {}
    for folder in folders:
        text = " ".join(_classname(folder).split())
        if text in by_text:
            raise DatasetError(
                f"class folders {str(parent / by_text[text])!r} and {str(parent / folder)!r} both name the class "
                f"{text!r} ('_' reads as a space), so both would get the same prompt; merge or rename one"
            )
        by_text[text] = folder
        lower = text.lower()
        if lower in by_lower:
            warnings.append(
                f"class folders {str(parent / by_lower[lower])!r} and {str(parent / folder)!r} differ only in case; "
                "CLIP's tokenizer lower-cases, so their prompts are identical: rename one"
            )
        by_lower.setdefault(lower, folder)


def _hidden_image_folders(parent: Path, warnings: list[str]) -> None:
    """Folders whose name starts with '.' are skipped (as .git, .ipynb_checkpoints should be); say so
    when one of them holds images, as it probably was meant to be a class."""
    with os.scandir(parent) as entries:
        hidden = sorted(e.name for e in entries if e.is_dir() and e.name.startswith("."))
    for name in hidden:
        if list_images(parent / name):
            warnings.append(f"skipped the folder {str(parent / name)!r}: names starting with '.' are hidden; "
                            "rename it if it is a class")


def _class_order(root: Path, found: list[str]) -> list[str]:
    """The class folders in label order: classes.txt's order if present, else sorted."""
    path = root / CLASS_ORDER_FILE
    if not path.is_file():
        return found
    listed = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if sorted(listed) != sorted(found) or len(set(listed)) != len(listed):
        raise DatasetError(
            f"{str(path)!r} must list each class folder exactly once; it lists {listed[:10]}, "
            f"the folders are {found[:10]}. Expected layout (docs/datasets.md):\n{IMAGEFOLDER_LAYOUT}"
        )
    return listed


def _read_split(folder: Path, classes: list[str], split: str) -> list[Sample]:
    label_of = {c: i for i, c in enumerate(classes)}
    found = list_subfolders(folder)
    unknown = [c for c in found if c not in label_of]
    if unknown:
        raise DatasetError(
            f"{split} folder {str(folder)!r} has class folders {unknown[:10]} that train/ lacks; every class "
            f"must appear in train/. Expected layout (docs/datasets.md):\n{IMAGEFOLDER_LAYOUT}"
        )
    samples = []
    present = set(found)
    for c in (c for c in classes if c in present):  # label order, so splits come sorted by label
        files = list_images(folder / c)
        if not files:
            raise DatasetError(f"class folder {str(folder / c)!r} holds no images (extensions: jpg, png, ...)")
        samples += [Sample(p, label_of[c], _classname(c)) for p in files]
    return samples


def load_imagefolder(root: Path) -> DatasetSplits:
    require_dir(root, "image folder root", IMAGEFOLDER_LAYOUT)
    name = root.resolve().name or "imagefolder"
    train_dir = root / "train"
    warnings: list[str] = []
    if train_dir.is_dir():
        classes = _class_order(root, list_subfolders(train_dir))
        if not classes:
            raise DatasetError(f"{str(train_dir)!r} has no class folders. Expected layout (docs/datasets.md):\n{IMAGEFOLDER_LAYOUT}")
        _check_class_names(train_dir, classes, warnings)
        for split in ("train", "val", "test"):
            if (root / split).is_dir():
                _hidden_image_folders(root / split, warnings)
        train = _read_split(train_dir, classes, "train")
        splits = {"train": train}
        for split in ("val", "test"):
            folder = root / split
            splits[split] = _read_split(folder, classes, split) if folder.is_dir() else []
        if not splits["test"]:
            log.warning("image folder %s has no test/ split: evaluation will have nothing to score", root)
        return DatasetSplits(name, [_classname(c) for c in classes], train, splits["val"], splits["test"],
                             warnings=warnings)

    classes = _class_order(root, list_subfolders(root))
    if not classes:
        raise DatasetError(f"{str(root)!r} has neither train/ nor class folders. Expected layout (docs/datasets.md):\n{IMAGEFOLDER_LAYOUT}")
    _check_class_names(root, classes, warnings)
    _hidden_image_folders(root, warnings)
    train, val, test = [], [], []
    for label, c in enumerate(classes):
        files = list_images(root / c)
        if not files:
            raise DatasetError(f"class folder {str(root / c)!r} holds no images (extensions: jpg, png, ...)")
        random.Random(c).shuffle(files)  # str seeds hash via SHA-512: stable across runs and machines
        n = len(files)
        n_test = min(round(n * FLAT_TEST_FRACTION), n - 1)
        n_val = min(round(n * FLAT_VAL_FRACTION), n - 1 - n_test)
        mk = lambda paths: [Sample(p, label, _classname(c)) for p in sorted(paths)]  # noqa: E731
        test += mk(files[:n_test])
        val += mk(files[n_test:n_test + n_val])
        train += mk(files[n_test + n_val:])
    return DatasetSplits(name, [_classname(c) for c in classes], train, val, test, warnings=warnings)
