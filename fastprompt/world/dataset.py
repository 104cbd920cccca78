"""The world as a dataset: rendered once per domain into an ImageFolder tree, read per task.

Layout under the data root (written on first use, deterministic, reused afterwards):

    <data root>/world/<domain>/{train,val,test}/<colour>_<shape>/<n>.png   all 64 pairs
    <data root>/world/<domain>/.fastprompt_world.json                       what was rendered

Dataset names for `data.dataset`: `world_<task>` (the clean domain, the pretraining distribution)
and `world_<task>_<domain>`; tasks in tasks.py, domains in domains.py. A task picks and orders
classes (its base/new split); a domain is how the images look. `export_imagefolder` writes one
task as a self-contained tree that `data.dataset=imagefolder` reads with the same labels.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.errors import DatasetError
from ..data.splits import DatasetSplits, Sample
from .catalog import FOLDER, dataset_name, dataset_names
from .domains import get_domain
from .render import render, to_uint8
from .scenes import attributes_for_pairs
from .tasks import Task, get_task
from .vocabulary import NUM_PAIRS, folder_name, pair_of

MARKER = ".fastprompt_world.json"
FORMAT_VERSION = 1
IMAGES_PER_PAIR = {"train": 32, "val": 8, "test": 40}


def _split_seed(domain: str, split: str) -> int:
    # Stable across runs and machines (Python's hash() of a str is salted per process).
    return int.from_bytes(hashlib.sha256(f"fastprompt-world/{domain}/{split}".encode()).digest()[:8], "little")


def _settings(domain: str) -> dict:
    return {"version": FORMAT_VERSION, "domain": domain, "render": get_domain(domain).to_dict(),
            "images_per_pair": IMAGES_PER_PAIR}


def _matches(folder: Path, settings: dict) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()) == json.loads(json.dumps(settings))
    except (OSError, json.JSONDecodeError):
        return False


def render_domain(world_dir: str | os.PathLike, domain: str) -> Path:
    """Render `domain` into `world_dir/<domain>/` (all 64 pairs, every split) unless it is already
    there with the same settings; returns that folder. Written in a temporary sibling and renamed
    into place, so a reader never sees half a tree and concurrent callers agree."""
    settings = _settings(domain)
    target = Path(world_dir) / domain
    if _matches(target, settings):
        return target
    if target.exists() and not (target / MARKER).is_file():
        raise DatasetError(f"{str(target)!r} exists but was not rendered by fastprompt (no {MARKER}); move it "
                           "away or point data.root elsewhere")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{domain}.", dir=target.parent))
    try:
        for split, per_pair in IMAGES_PER_PAIR.items():
            generator = torch.Generator().manual_seed(_split_seed(domain, split))
            pairs = torch.arange(NUM_PAIRS).repeat_interleave(per_pair)
            a = attributes_for_pairs(pairs, generator)
            images = to_uint8(render(a[:, 0], a[:, 1], a[:, 2], a[:, 3], generator=generator,
                                     domain=get_domain(domain))).permute(0, 2, 3, 1).numpy()
            for pair in range(NUM_PAIRS):
                folder = tmp / split / folder_name(*pair_of(pair))
                folder.mkdir(parents=True)
                for k in range(per_pair):
                    Image.fromarray(np.ascontiguousarray(images[pair * per_pair + k])).save(folder / f"{k:04d}.png")
        (tmp / MARKER).write_text(json.dumps(settings, indent=1))
        if target.exists():  # an older rendering of ours (settings changed): replace it
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _matches(target, settings):  # another process renamed its copy first: fine if it matches
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_world(world_dir: str | os.PathLike, task: str, domain: str = "clean") -> DatasetSplits:
    """The task's classes over the domain's images (rendered first if needed)."""
    t = get_task(task)
    folder = render_domain(world_dir, domain)
    splits = {}
    for split in IMAGES_PER_PAIR:
        samples = []
        for label, cls in enumerate(t.classes):
            for pair in cls.pairs:
                d = folder / split / folder_name(*pair_of(pair))
                samples += [Sample(str(p), label, cls.name) for p in sorted(d.glob("*.png"))]
        splits[split] = samples
    if not all(splits.values()):
        raise DatasetError(f"{folder} is missing images; delete it and it is rendered again")
    return DatasetSplits(dataset_name(task, domain), t.classnames, splits["train"], splits["val"], splits["test"])


def export_imagefolder(out: str | os.PathLike, task: str, domain: str = "clean",
                       world_dir: str | os.PathLike | None = None) -> Path:
    """Write `task` in `domain` as a plain tree `out/{train,val,test}/<class>/*.png` with
    `out/classes.txt` in label order, so `data.dataset=imagefolder data.root=out` has the same
    classes and base/new split. `out` must not exist yet. Returns `out`."""
    out = Path(out)
    if out.exists():
        raise DatasetError(f"{str(out)!r} exists; export into a new folder")
    with tempfile.TemporaryDirectory() as scratch:
        splits = load_world(world_dir or Path(scratch) / FOLDER, task, domain)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent if out.parent.exists() else None))
        try:
            for split in ("train", "val", "test"):
                for s in getattr(splits, split):
                    pair_folder = Path(s.path).parent.name  # keeps file names unique across merged pairs
                    dest = tmp / split / s.classname.replace(" ", "_") / f"{pair_folder}_{Path(s.path).name}"
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(s.path, dest)
            (tmp / "classes.txt").write_text("".join(c.replace(" ", "_") + "\n" for c in splits.classnames))
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(tmp), out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
