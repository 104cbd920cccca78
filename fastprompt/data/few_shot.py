"""CoOp's few-shot protocol: a fixed number of images per class, sampled per (dataset, shots, seed).

The sample is cached as JSON so a rerun (or another method on the same seed) trains on exactly
the same images. The cache stores positions into the full train/val lists plus a fingerprint of
those lists; if the data on disk changed, the fingerprint no longer matches, a warning is logged
and the sample is drawn again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from .errors import DatasetError
from .splits import DatasetSplits, Sample

log = logging.getLogger(__name__)

MAX_VAL_SHOTS = 4  # CoOp samples min(shots, 4) validation images per class
CACHE_VERSION = 1


def _fingerprint(samples: list[Sample]) -> str:
    # Paths relative to their common folder, so moving the data root keeps the cache valid.
    if not samples:
        return hashlib.sha256(b"").hexdigest()
    base = os.path.commonpath(list({os.path.dirname(s.path) for s in samples}))
    cut = len(os.path.join(base, ""))  # string slicing: os.path.relpath is too slow for ImageNet's 1.28M paths
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.path[cut:]}\t{s.label}\n".encode())
    return h.hexdigest()


def _sample_per_class(samples: list[Sample], k: int, rng: random.Random) -> list[int]:
    """Positions of k samples per label (all of a class's samples if it has fewer), label-sorted."""
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_label[s.label].append(i)
    chosen: list[int] = []
    for label in sorted(by_label):
        pool = by_label[label]
        chosen += sorted(rng.sample(pool, k)) if len(pool) > k else pool
    return chosen


def cache_path(cache_dir: str | os.PathLike, name: str, shots: int, seed: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return Path(cache_dir) / f"{safe}_shots{shots}_seed{seed}.json"


def _write_atomic(path: Path, payload: dict) -> None:
    from ..atomic_io import atomic_write_bytes, ensure_dir

    ensure_dir(path.parent)
    atomic_write_bytes(path, json.dumps(payload).encode("utf-8"))


def _read_cache(path: Path, train_fp: str, val_fp: str, n_train: int, n_val: int) -> tuple[list[int], list[int]] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("few-shot cache %s is unreadable (%s); sampling again", path, exc)
        return None
    ok = (
        isinstance(data, dict) and data.get("version") == CACHE_VERSION
        and data.get("train_fingerprint") == train_fp and data.get("val_fingerprint") == val_fp
    )
    if not ok:
        log.warning("few-shot cache %s was made from different data (fingerprint mismatch); sampling again", path)
        return None
    train_idx, val_idx = data.get("train"), data.get("val")
    valid = (
        isinstance(train_idx, list) and isinstance(val_idx, list)
        and all(isinstance(i, int) and 0 <= i < n_train for i in train_idx)
        and all(isinstance(i, int) and 0 <= i < n_val for i in val_idx)
    )
    if not valid:
        log.warning("few-shot cache %s holds invalid indices; sampling again", path)
        return None
    return train_idx, val_idx


def few_shot_split(
    splits: DatasetSplits, shots: int, seed: int, cache_dir: str | os.PathLike | None = None
) -> DatasetSplits:
    """`shots` train and min(shots, 4) val images per class; test is returned untouched.

    Sampling uses a local `random.Random(seed)` (never global state), classes in label order, so the
    same (dataset, shots, seed) always gives the same images. With `cache_dir`, the choice is stored
    at `<cache_dir>/<name>_shots<shots>_seed<seed>.json` (written atomically) and reused. Classes
    with fewer images than requested keep all of theirs, as in CoOp. Apply before `split_base_new`.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be a positive integer, got {shots!r}")
    if not splits.train:
        raise DatasetError(f"{splits.name} has no training split to sample few-shot images from")
    train_fp, val_fp = _fingerprint(splits.train), _fingerprint(splits.val)
    path = cache_path(cache_dir, splits.name, shots, seed) if cache_dir is not None else None

    cached = _read_cache(path, train_fp, val_fp, len(splits.train), len(splits.val)) if path and path.exists() else None
    if cached is not None:
        train_idx, val_idx = cached
    else:
        rng = random.Random(seed)
        train_idx = _sample_per_class(splits.train, shots, rng)
        val_idx = _sample_per_class(splits.val, min(shots, MAX_VAL_SHOTS), rng)
        if path is not None:
            _write_atomic(path, {
                "version": CACHE_VERSION, "dataset": splits.name, "shots": shots, "seed": seed,
                "train_fingerprint": train_fp, "val_fingerprint": val_fp,
                "train": train_idx, "val": val_idx,
                # For people reading the file: which images were picked.
                "train_paths": [splits.train[i].path for i in train_idx],
            })
    return replace(
        splits,
        train=[splits.train[i] for i in train_idx],
        val=[splits.val[i] for i in val_idx],
        test=splits.test,
    )
