"""Writers for tiny fake dataset trees in every layout fastprompt reads (real PNG/JPEG files)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, size=(12, 9), seed: int = 0, fmt: str | None = None) -> Path:
    """A small random RGB image (size = (w, h)); format from the suffix unless given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return path


# name -> (dataset folder, image folder, split file); class names mimic CoOp's cleaned ones.
SPLIT_FILE_DATASETS = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
CLASSNAMES = ["annual crop land", "forest", "herbaceous vegetation land", "highway", "industrial buildings"]


def write_split_file_dataset(root: Path, name: str, per_split=(6, 3, 2), classnames=CLASSNAMES) -> dict:
    """Images + a split_zhou json; returns the json content. Cars' relpaths start with cars_train/."""
    folder, image_dir, split_file = SPLIT_FILE_DATASETS[name]
    ds = root / folder
    images = ds / image_dir if image_dir else ds
    content = {}
    seed = 0
    for split, n in zip(("train", "val", "test"), per_split):
        rows = []
        for label, cname in enumerate(classnames):
            for k in range(n):
                sub = ("cars_test" if split == "test" else "cars_train") if name == "stanford_cars" else cname.replace(" ", "_")
                rel = f"{sub}/{split}_{label}_{k}.jpg"
                write_image(images / rel, seed=seed)
                seed += 1
                rows.append([rel, label, cname])
        content[split] = rows
    (ds / split_file).write_text(json.dumps(content))
    return content


FGVC_VARIANTS = ["707-320", "A300B4", "Boeing 717", "F-16A/B"]


def write_fgvc(root: Path, per_split=(5, 2, 2)) -> None:
    ds = root / "fgvc_aircraft"
    (ds / "images").mkdir(parents=True)
    (ds / "variants.txt").write_text("\n".join(FGVC_VARIANTS) + "\n")
    image_id = 1000000
    for split, n in zip(("train", "val", "test"), per_split):
        lines = []
        for v in FGVC_VARIANTS:
            for _ in range(n):
                write_image(ds / "images" / f"{image_id}.jpg", seed=image_id)
                lines.append(f"{image_id} {v}")
                image_id += 1
        (ds / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")


IMAGENET_WNIDS = {
    "n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
    "n01491361": "tiger shark", "n01494475": "hammerhead shark", "n01496331": "electric ray",
}


def write_classnames(path: Path, wnids=IMAGENET_WNIDS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} {n}\n" for w, n in wnids.items()))


def write_imagenet(root: Path, n_train=4, n_val=2) -> None:
    ds = root / "imagenet"
    write_classnames(ds / "classnames.txt")
    for split, n in (("train", n_train), ("val", n_val)):
        for w in IMAGENET_WNIDS:
            for k in range(n):
                write_image(ds / "images" / split / w / f"{w}_{k}.JPEG", seed=k, fmt="JPEG")


def write_imagenet_variants(root: Path, subset=("n01443537", "n01491361", "n01496331")) -> None:
    """V2 (index folders), Sketch (all wnids), A and R (a subset of wnids); classnames only under imagenet/."""
    write_classnames(root / "imagenet" / "classnames.txt")
    for i in range(len(IMAGENET_WNIDS)):
        write_image(root / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(i) / "a.jpeg", seed=i)
    for w in IMAGENET_WNIDS:
        for k in range(2):
            write_image(root / "imagenet-sketch" / "images" / w / f"s{k}.JPEG", seed=k)
    for folder, sub in (("imagenet-adversarial", "imagenet-a"), ("imagenet-rendition", "imagenet-r")):
        (root / folder / sub).mkdir(parents=True)
        (root / folder / sub / "README.txt").write_text("readme that must be ignored")
        for w in subset:
            for k in range(3):
                write_image(root / folder / sub / w / f"{k}.jpg", seed=k)
