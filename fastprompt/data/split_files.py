"""Datasets described by CoOp's `split_zhou_*.json` files, and FGVCAircraft's own txt split files."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import DatasetError
from .images import require_dir, require_file
from .splits import DatasetSplits, Sample

SPLIT_NAMES = ("train", "val", "test")


def split_file_layout(folder: str, image_dir: str, split_file: str) -> str:
    images = f"{image_dir}/" if image_dir else "<the relpaths of the split file, e.g. cars_train/...>"
    return (
        f"<data root>/\n"
        f"  {folder}/\n"
        f"    {split_file}    {{\"train\": [[relpath, label, classname], ...], \"val\": [...], \"test\": [...]}}\n"
        f"    {images}    (relpath is relative to this folder)"
    )


def load_split_file_dataset(
    name: str, dataset_dir: Path, image_dir: str, split_file: str, folder: str
) -> DatasetSplits:
    """Read a CoOp split file: rows `[relpath, label, classname]`, relpath under `dataset_dir/image_dir`.

    Class names come from the third column (CoOp's cleaned names); every label must map to one name,
    labels must run 0..N-1 and every class needs at least one training image.
    """
    layout = split_file_layout(folder, image_dir, split_file)
    require_dir(dataset_dir, f"{name} folder", layout)
    split_path = dataset_dir / split_file
    require_file(split_path, f"{name} split file", layout)
    images_root = dataset_dir / image_dir if image_dir else dataset_dir
    require_dir(images_root, f"{name} image folder", layout)

    try:
        with open(split_path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"split file {str(split_path)!r} is not valid JSON: {exc}. Expected layout (docs/datasets.md):\n{layout}") from exc
    if not isinstance(raw, dict) or any(k not in raw for k in SPLIT_NAMES):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise DatasetError(
            f"split file {str(split_path)!r} must be a JSON object with keys 'train', 'val', 'test' "
            f"(found {found}). Expected layout (docs/datasets.md):\n{layout}"
        )

    base = os.path.abspath(images_root)
    names: dict[int, str] = {}
    parsed: dict[str, list[Sample]] = {}
    for split in SPLIT_NAMES:
        rows = raw[split]
        if not isinstance(rows, list):
            raise DatasetError(f"split file {str(split_path)!r}: {split!r} must be a list of [relpath, label, classname] rows")
        samples = []
        for i, row in enumerate(rows):
            ok = (
                isinstance(row, (list, tuple)) and len(row) == 3 and isinstance(row[0], str)
                and isinstance(row[1], int) and not isinstance(row[1], bool) and row[1] >= 0
                and isinstance(row[2], str) and row[2]
            )
            if not ok:
                raise DatasetError(
                    f"split file {str(split_path)!r}: row {i} of {split!r} is {row!r}; expected "
                    f"[relpath (str), label (int >= 0), classname (str)], e.g. [\"cls/img_001.jpg\", 0, \"cls\"]"
                )
            relpath, label, classname = row
            previous = names.setdefault(label, classname)
            if previous != classname:
                raise DatasetError(
                    f"split file {str(split_path)!r}: label {label} is named both {previous!r} and "
                    f"{classname!r} (row {i} of {split!r}); each label must have exactly one class name"
                )
            samples.append(Sample(os.path.join(base, relpath), label, classname))
        parsed[split] = samples

    n = max(names, default=-1) + 1
    missing = [lab for lab in range(n) if lab not in names]
    if missing or n == 0:
        raise DatasetError(
            f"split file {str(split_path)!r}: labels must run 0..N-1 with no gaps; "
            + (f"missing labels {missing[:20]}" if missing else "it lists no samples")
        )
    in_train = {s.label for s in parsed["train"]}
    empty = [names[lab] for lab in range(n) if lab not in in_train]
    if empty:
        raise DatasetError(f"split file {str(split_path)!r}: classes with no training image: {empty[:20]}")
    # One existence check per split catches a wrong image folder early without statting every file.
    for split in SPLIT_NAMES:
        if parsed[split] and not os.path.isfile(parsed[split][0].path):
            raise DatasetError(
                f"{name}: image {parsed[split][0].path!r} (first row of {split!r} in {str(split_path)!r}) "
                f"does not exist; relpaths are resolved under {base!r}. Expected layout (docs/datasets.md):\n{layout}"
            )
    return DatasetSplits(name, [names[lab] for lab in range(n)], parsed["train"], parsed["val"], parsed["test"])


FGVC_LAYOUT = (
    "<data root>/\n"
    "  fgvc_aircraft/\n"
    "    images/<image_id>.jpg\n"
    "    variants.txt                    one variant name per line (defines label order)\n"
    "    images_variant_train.txt        lines \"<image_id> <variant name>\"\n"
    "    images_variant_val.txt\n"
    "    images_variant_test.txt"
)


def load_fgvc_aircraft(dataset_dir: Path) -> DatasetSplits:
    """FGVCAircraft from its own files: labels follow variants.txt's line order, as in CoOp."""
    require_dir(dataset_dir, "fgvc_aircraft folder", FGVC_LAYOUT)
    variants_path = dataset_dir / "variants.txt"
    require_file(variants_path, "fgvc_aircraft class list", FGVC_LAYOUT)
    image_dir = dataset_dir / "images"
    require_dir(image_dir, "fgvc_aircraft image folder", FGVC_LAYOUT)
    classnames = [line.strip() for line in variants_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not classnames:
        raise DatasetError(f"{str(variants_path)!r} lists no variants. Expected layout (docs/datasets.md):\n{FGVC_LAYOUT}")
    if len(set(classnames)) != len(classnames):
        raise DatasetError(f"{str(variants_path)!r} lists a variant twice")
    label_of = {c: i for i, c in enumerate(classnames)}
    base = os.path.abspath(image_dir)

    splits: dict[str, list[Sample]] = {}
    for split in SPLIT_NAMES:
        path = dataset_dir / f"images_variant_{split}.txt"
        require_file(path, f"fgvc_aircraft {split} list", FGVC_LAYOUT)
        samples = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.strip().split(" ", 1)
            if len(parts) != 2 or not parts[1].strip():
                raise DatasetError(f"{str(path)!r} line {lineno}: {line!r}; expected \"<image_id> <variant name>\"")
            image_id, variant = parts[0], parts[1].strip()
            if variant not in label_of:
                raise DatasetError(f"{str(path)!r} line {lineno}: variant {variant!r} is not in {str(variants_path)!r}")
            samples.append(Sample(os.path.join(base, f"{image_id}.jpg"), label_of[variant], variant))
        splits[split] = samples
    in_train = {s.label for s in splits["train"]}
    empty = [c for c in classnames if label_of[c] not in in_train]
    if empty:
        raise DatasetError(f"fgvc_aircraft: variants with no training image in images_variant_train.txt: {empty[:20]}")
    for split in SPLIT_NAMES:
        if splits[split] and not os.path.isfile(splits[split][0].path):
            raise DatasetError(
                f"fgvc_aircraft: image {splits[split][0].path!r} (first line of images_variant_{split}.txt) "
                f"does not exist. Expected layout (docs/datasets.md):\n{FGVC_LAYOUT}"
            )
    return DatasetSplits("fgvc_aircraft", classnames, splits["train"], splits["val"], splits["test"])
