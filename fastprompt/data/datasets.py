"""The dataset registry and `load_dataset`: one entry per supported layout.

The data root holds CoOp's community layout (users bring the files; docs/datasets.md):

    <data root>/
      imagenet/classnames.txt, imagenet/images/{train,val}/<wnid>/*       test = val
      caltech-101/{101_ObjectCategories/, split_zhou_Caltech101.json}
      oxford_pets/{images/, split_zhou_OxfordPets.json}
      stanford_cars/{cars_train/, cars_test/, split_zhou_StanfordCars.json}
      oxford_flowers/{jpg/, split_zhou_OxfordFlowers.json}
      food-101/{images/, split_zhou_Food101.json}
      fgvc_aircraft/{images/<id>.jpg, variants.txt, images_variant_{train,val,test}.txt}
      sun397/{SUN397/, split_zhou_SUN397.json}
      dtd/{images/, split_zhou_DescribableTextures.json}
      eurosat/{2750/, split_zhou_EuroSAT.json}
      ucf101/{UCF-101-midframes/, split_zhou_UCF101.json}
      imagenetv2/imagenetv2-matched-frequency-format-val/<label 0..999>/*
      imagenet-sketch/images/<wnid>/*
      imagenet-adversarial/imagenet-a/<wnid>/*      (200 classes; `class_indices` -> ImageNet labels)
      imagenet-rendition/imagenet-r/<wnid>/*        (200 classes; likewise)

The four ImageNet variants read ImageNet's classnames.txt from their own folder if present (CoOp's
instructions copy it there), else from `<data root>/imagenet/classnames.txt`; they have only a
test split. Class names of the split-file datasets are the split files' third column (CoOp's
cleaned names). "imagefolder" reads a user's own tree (see `imagefolder.py`); its dataset name is
the folder's name. The `world_*` datasets are rendered by fastprompt itself into
`<data root>/world/` on first use (docs/world.md): nothing to download.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import DatasetError
from .imagefolder import IMAGEFOLDER_LAYOUT, load_imagefolder
from .images import require_dir
from .imagenet import IMAGENET_LAYOUT, load_imagenet, load_imagenet_variant, variant_layout
from .split_files import FGVC_LAYOUT, load_fgvc_aircraft, load_split_file_dataset, split_file_layout
from .splits import DatasetSplits, coverage_warnings
from ..world.catalog import FOLDER as WORLD_FOLDER, LAYOUT as WORLD_LAYOUT, dataset_names as world_dataset_names

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSpec:
    """How to find and read one dataset under a data root.

    `folder` is the dataset's folder under the data root (None: the root itself is the dataset, as
    for "imagefolder"); `layout` is the expected tree, shown in errors and docs.
    """

    name: str
    folder: str | None
    layout: str
    read: Callable[[Path, Path], DatasetSplits]  # (data root, dataset folder) -> splits
    generated: bool = False  # rendered by fastprompt on first use: its folder need not exist yet


def _split_file_spec(name: str, folder: str, image_dir: str, split_file: str) -> DatasetSpec:
    return DatasetSpec(
        name, folder, split_file_layout(folder, image_dir, split_file),
        lambda root, d: load_split_file_dataset(name, d, image_dir, split_file, folder),
    )


def _variant_spec(name: str, folder: str) -> DatasetSpec:
    return DatasetSpec(name, folder, variant_layout(name), lambda root, d: load_imagenet_variant(root, name))


DATASETS: dict[str, DatasetSpec] = {
    "imagenet": DatasetSpec("imagenet", "imagenet", IMAGENET_LAYOUT, lambda root, d: load_imagenet(d)),
    "caltech101": _split_file_spec("caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": _split_file_spec("oxford_pets", "oxford_pets", "images", "split_zhou_OxfordPets.json"),
    # Cars' relpaths already start with cars_train/ or cars_test/, so the image folder is the dataset folder.
    "stanford_cars": _split_file_spec("stanford_cars", "stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": _split_file_spec("oxford_flowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": _split_file_spec("food101", "food-101", "images", "split_zhou_Food101.json"),
    "fgvc_aircraft": DatasetSpec("fgvc_aircraft", "fgvc_aircraft", FGVC_LAYOUT, lambda root, d: load_fgvc_aircraft(d)),
    "sun397": _split_file_spec("sun397", "sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": _split_file_spec("dtd", "dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": _split_file_spec("eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": _split_file_spec("ucf101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
    "imagenet_v2": _variant_spec("imagenet_v2", "imagenetv2"),
    "imagenet_sketch": _variant_spec("imagenet_sketch", "imagenet-sketch"),
    "imagenet_a": _variant_spec("imagenet_a", "imagenet-adversarial"),
    "imagenet_r": _variant_spec("imagenet_r", "imagenet-rendition"),
    "imagefolder": DatasetSpec("imagefolder", None, IMAGEFOLDER_LAYOUT, lambda root, d: load_imagefolder(d)),
}


def _world_spec(name: str, task: str, domain: str) -> DatasetSpec:
    def read(root: Path, folder: Path) -> DatasetSplits:
        from ..world.dataset import load_world  # imports the data layer: not at module level

        return load_world(folder, task, domain)

    return DatasetSpec(name, WORLD_FOLDER, WORLD_LAYOUT, read, generated=True)


DATASETS.update({name: _world_spec(name, task, domain) for name, (task, domain) in world_dataset_names().items()})


def locate_dataset(name: str, root: str | os.PathLike) -> tuple[Path, Path]:
    """(data root, dataset folder) of dataset `name` under `root`, checked to exist: the cheap part of
    `load_dataset`, which commands run before anything slow (a weights download). DatasetError
    naming the path and showing the expected tree otherwise."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    spec = DATASETS[name]
    root = Path(root).expanduser()
    if spec.generated and (root.is_dir() or not root.exists()):
        return root, root / spec.folder  # rendered into place by its reader on first use
    if not root.is_dir():
        state = "is not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"data root {str(root)!r} for {name} {state}. Expected layout (docs/datasets.md):\n{spec.layout}")
    if spec.folder is None:
        return root, root
    dataset_dir = root / spec.folder
    if not dataset_dir.exists() and root.name == spec.folder:
        dataset_dir, root = root, root.parent  # the user pointed at the dataset folder itself
    require_dir(dataset_dir, f"{name} folder", spec.layout)
    return root, dataset_dir


def load_dataset(name: str, root: str | os.PathLike) -> DatasetSplits:
    """Read dataset `name` from the data root `root` (the community layout, docs/datasets.md).

    For "imagefolder", `root` is the image folder itself. For the others `root` is the data root
    holding e.g. `caltech-101/`; `root` may also be the dataset's own folder when it carries the
    layout's folder name (e.g. `/data/caltech-101`). Raises DatasetError, naming the path
    and showing the expected tree, when the layout does not match.
    """
    root, dataset_dir = locate_dataset(name, root)
    splits = DATASETS[name].read(root, dataset_dir)
    splits.warnings.extend(coverage_warnings(splits))
    for warning in splits.warnings:
        log.warning(warning)
    return splits
