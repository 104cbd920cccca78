"""ImageNet in CoOp's layout, and the four domain-shift variants that reuse its class list.

All five read the same `classnames.txt` ("<wnid> <class name>" per line, 1000 lines, label = line
order). The variants look for it first in their own folder (CoOp's instructions copy it there),
then at `<data root>/imagenet/classnames.txt`.
"""
from __future__ import annotations

from pathlib import Path

from .errors import DatasetError
from .images import list_images, list_subfolders, require_dir, require_file
from .splits import DatasetSplits, Sample

IMAGENET_LAYOUT = (
    "<data root>/\n"
    "  imagenet/\n"
    "    classnames.txt          lines \"<wnid> <class name>\", e.g. \"n01440764 tench\"\n"
    "    images/train/<wnid>/*.JPEG\n"
    "    images/val/<wnid>/*.JPEG   (val sorted into wnid folders; it is also the test split)"
)

VARIANT_LAYOUTS = {
    "imagenet_v2": "imagenetv2/imagenetv2-matched-frequency-format-val/<class index 0..999>/*.jpeg",
    "imagenet_sketch": "imagenet-sketch/images/<wnid>/*.JPEG",
    "imagenet_a": "imagenet-adversarial/imagenet-a/<wnid>/*.jpg   (200 of the 1000 wnids)",
    "imagenet_r": "imagenet-rendition/imagenet-r/<wnid>/*.jpg     (200 of the 1000 wnids)",
}
VARIANT_DIRS = {
    "imagenet_v2": ("imagenetv2", "imagenetv2-matched-frequency-format-val"),
    "imagenet_sketch": ("imagenet-sketch", "images"),
    "imagenet_a": ("imagenet-adversarial", "imagenet-a"),
    "imagenet_r": ("imagenet-rendition", "imagenet-r"),
}


def variant_layout(name: str) -> str:
    folder = VARIANT_DIRS[name][0]
    return (
        "<data root>/\n"
        f"  {VARIANT_LAYOUTS[name]}\n"
        f"  {folder}/classnames.txt  or  imagenet/classnames.txt   (ImageNet's \"<wnid> <class name>\" list)"
    )


def read_classnames(path: Path) -> dict[str, str]:
    """Parse classnames.txt into an ordered {wnid: class name}; the order defines the labels."""
    out: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(" ", 1)
        if len(parts) != 2 or not parts[1].strip():
            raise DatasetError(f"{str(path)!r} line {lineno}: {line!r}; expected \"<wnid> <class name>\"")
        if parts[0] in out:
            raise DatasetError(f"{str(path)!r} line {lineno}: wnid {parts[0]!r} appears twice")
        out[parts[0]] = parts[1].strip()
    if not out:
        raise DatasetError(f"{str(path)!r} lists no classes; expected lines \"<wnid> <class name>\"")
    return out


def _class_folder_samples(folder: Path, wnids: dict[str, str], split_desc: str, layout: str,
                          require_all: bool) -> tuple[list[Sample], list[str]]:
    """Samples from `folder/<wnid>/*` labelled by classnames.txt order; returns (samples, wnids found)."""
    require_dir(folder, split_desc, layout)
    label_of = {w: i for i, w in enumerate(wnids)}
    found = list_subfolders(folder)
    if not found and list_images(folder):
        raise DatasetError(
            f"{split_desc} {str(folder)!r} holds images directly; they must be sorted into one folder "
            f"per wnid. Expected layout (docs/datasets.md):\n{layout}"
        )
    unknown = [w for w in found if w not in label_of]
    if unknown:
        raise DatasetError(f"{split_desc} {str(folder)!r}: folders {unknown[:10]} are not wnids of classnames.txt")
    if require_all:
        missing = [w for w in wnids if w not in set(found)]
        if missing:
            raise DatasetError(
                f"{split_desc} {str(folder)!r}: no folder for {len(missing)} classes of classnames.txt, "
                f"e.g. {missing[:5]}. Expected layout (docs/datasets.md):\n{layout}"
            )
    samples: list[Sample] = []
    for wnid in found:
        files = list_images(folder / wnid)
        if not files:
            raise DatasetError(f"{split_desc}: class folder {str(folder / wnid)!r} holds no images")
        samples += [Sample(p, label_of[wnid], wnids[wnid]) for p in files]
    samples.sort(key=lambda s: s.label)  # stable: keeps file order within a class
    return samples, found


def load_imagenet(dataset_dir: Path) -> DatasetSplits:
    """ImageNet: train from images/train, val from images/val, test = val (as CoOp)."""
    require_dir(dataset_dir, "imagenet folder", IMAGENET_LAYOUT)
    names_path = dataset_dir / "classnames.txt"
    require_file(names_path, "ImageNet class list", IMAGENET_LAYOUT)
    wnids = read_classnames(names_path)
    train, _ = _class_folder_samples(dataset_dir / "images" / "train", wnids, "ImageNet train folder", IMAGENET_LAYOUT, True)
    val, _ = _class_folder_samples(dataset_dir / "images" / "val", wnids, "ImageNet val folder", IMAGENET_LAYOUT, True)
    return DatasetSplits("imagenet", list(wnids.values()), train, val, list(val))


def _find_classnames(root: Path, name: str) -> dict[str, str]:
    candidates = [root / VARIANT_DIRS[name][0] / "classnames.txt", root / "imagenet" / "classnames.txt"]
    for path in candidates:
        if path.is_file():
            return read_classnames(path)
    raise DatasetError(
        f"{name} needs ImageNet's classnames.txt; looked at {[str(p) for p in candidates]}. "
        f"Expected layout (docs/datasets.md):\n{variant_layout(name)}"
    )


def load_imagenet_variant(root: Path, name: str) -> DatasetSplits:
    """A test-only ImageNet variant (train and val are empty).

    V2 and Sketch use all 1000 labels. A and R use their 200 classes, labelled 0..199 in sorted wnid
    order (as CoOp), and `class_indices` gives each one's ImageNet label.
    """
    layout = variant_layout(name)
    folder_name, sub = VARIANT_DIRS[name]
    require_dir(root / folder_name, f"{name} folder", layout)
    image_dir = root / folder_name / sub
    require_dir(image_dir, f"{name} image folder", layout)
    wnids = _find_classnames(root, name)
    classnames = list(wnids.values())

    if name == "imagenet_v2":
        # Folders are named by ImageNet label, not by wnid.
        expected = [str(i) for i in range(len(classnames))]
        present = set(list_subfolders(image_dir))
        missing = [d for d in expected if d not in present]
        if missing:
            raise DatasetError(f"{name}: {str(image_dir)!r} lacks class folders {missing[:10]}. Expected layout (docs/datasets.md):\n{layout}")
        test = []
        for label, d in enumerate(expected):
            files = list_images(image_dir / d)
            if not files:
                raise DatasetError(f"{name}: class folder {str(image_dir / d)!r} holds no images")
            test += [Sample(p, label, classnames[label]) for p in files]
        return DatasetSplits(name, classnames, [], [], test)

    if name == "imagenet_sketch":
        test, _ = _class_folder_samples(image_dir, wnids, f"{name} image folder", layout, True)
        return DatasetSplits(name, classnames, [], [], test)

    # imagenet_a / imagenet_r: a subset of classes (their folder also holds a README.txt).
    full, found = _class_folder_samples(image_dir, wnids, f"{name} image folder", layout, False)
    if not found:
        raise DatasetError(f"{name}: {str(image_dir)!r} holds no class folders. Expected layout (docs/datasets.md):\n{layout}")
    index_in_imagenet = {w: i for i, w in enumerate(wnids)}
    class_indices = [index_in_imagenet[w] for w in found]  # `found` is sorted by wnid
    new_label = {old: new for new, old in enumerate(class_indices)}
    test = [Sample(s.path, new_label[s.label], s.classname) for s in full]
    return DatasetSplits(name, [classnames[i] for i in class_indices], [], [], test, class_indices=class_indices)
