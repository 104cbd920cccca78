"""Test-image features cached per frozen backbone: encoded once, then shared by base and new
classes, every epoch, seed and method that uses an unprompted image encoder (CoOp, CoCoOp, KgCoOp
and their DePT variants).

The cache is keyed by a fingerprint of everything that determines image features (architecture and
activation, weights, dtype, preprocessing, compute precision) and by each image file's identity
(path, size, mtime): a replaced image, another backbone or precision get their own features.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from ..atomic_io import atomic_write_bytes, ensure_dir

__all__ = ["backbone_fingerprint", "EvalFeatureCache", "encode_samples"]


def backbone_fingerprint(clip, precision: str) -> str:
    """A short hash of everything that determines image features: architecture (activation included:
    the same weights give other features under GELU and QuickGELU), weights, dtype, preprocessing and
    compute precision. Random-init backbones differ by their weights digest."""
    digest = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, tensor in clip.model.visual.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    meta = {"model": clip.name, "activation": clip.activation, "dtype": str(clip.dtype), "precision": precision,
            "image_size": clip.image_size, "mean": list(clip.mean), "std": list(clip.std), "weights": digest.hexdigest()}
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]


def _file_key(path: str) -> str:
    # The file's identity and version: a replaced image gets a new key (and new features).
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


class EvalFeatureCache:
    """Test-image features of one frozen backbone, in memory and on disk under `root`.

    `features(encode, samples)` returns (features [n, d], labels [n]) for the samples whose images
    could be read; only images not seen before are encoded (by `encode(samples) -> iterator of
    (features, sample indices)`). One file per backbone fingerprint and image folder (the common
    parent of the samples), so base and new test sets of one dataset share a file.
    """

    def __init__(self, root: str | os.PathLike, fingerprint: str):
        self.root = Path(root) / fingerprint
        self.fingerprint = fingerprint
        self._stores: dict[str, dict] = {}
        self.encoded = 0  # images encoded by this cache object (the rest came from the cache)

    def _store(self, samples: Sequence) -> tuple[Path, dict]:
        folder = os.path.commonpath([os.path.dirname(os.path.abspath(s.path)) for s in samples])
        name = hashlib.sha256(folder.encode()).hexdigest()[:16]
        path = self.root / f"{name}.safetensors"
        if name not in self._stores:
            store = {"folder": folder, "keys": {}, "features": None}
            if path.is_file():
                # safetensors + JSON metadata: nothing read from disk is ever unpickled.
                try:
                    with safe_open(str(path), framework="pt") as f:
                        keys = json.loads(f.metadata()["keys"])
                        features = f.get_tensor("features")
                    if len(keys) != features.shape[0]:
                        raise ValueError(f"{len(keys)} keys for {features.shape[0]} rows")
                    store["keys"] = {k: i for i, k in enumerate(keys)}
                    store["features"] = features
                except Exception as exc:  # a damaged cache is only a cache: encode again
                    logging.getLogger(__name__).warning("feature cache %s unreadable (%s); encoding again", path, exc)
            self._stores[name] = store
        return path, self._stores[name]

    def features(self, encode: Callable, samples: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        path, store = self._store(samples)
        keys = []
        for s in samples:
            try:
                keys.append(_file_key(s.path))
            except OSError:
                keys.append(None)  # unreadable: the encoder decides (error, or skip with allow_corrupt)
        # Encode each new file once (a test list may repeat a path); unreadable files (no key) still go
        # to the encoder, which raises or, with allow_corrupt, skips them, and are never stored.
        todo, queued = [], set()
        for i, k in enumerate(keys):
            if k is None or (k not in store["keys"] and k not in queued):
                todo.append(i)
                if k is not None:
                    queued.add(k)
        if todo:
            new_rows, new_keys = [], []
            for feats, idx in encode([samples[i] for i in todo]):
                batch_keys = [keys[todo[j]] for j in idx.tolist()]
                keep = [p for p, k in enumerate(batch_keys) if k is not None]
                new_rows.append(feats.detach().to("cpu")[keep])
                new_keys += [batch_keys[p] for p in keep]
            self.encoded += len(new_keys)
            if new_keys:
                added = torch.cat(new_rows)
                old = store["features"]
                base = 0 if old is None else old.shape[0]
                store["features"] = added if old is None else torch.cat([old, added.to(old.dtype)])
                store["keys"].update({k: base + j for j, k in enumerate(new_keys)})
                ensure_dir(self.root)
                ordered = sorted(store["keys"], key=store["keys"].get)
                atomic_write_bytes(path, st_save({"features": store["features"].contiguous()},
                                                 metadata={"keys": json.dumps(ordered)}))
        present = [i for i, k in enumerate(keys) if k is not None and k in store["keys"]]
        rows = torch.tensor([store["keys"][keys[i]] for i in present], dtype=torch.long)
        labels = torch.tensor([samples[i].label for i in present], dtype=torch.long)
        feats = store["features"][rows] if store["features"] is not None else torch.empty(0)
        return feats, labels


def encode_samples(encode_images: Callable, samples: Sequence, *, loader_factory: Callable, device: torch.device,
                   autocast: Callable) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Features of `samples` through the evaluation loader, with each batch's sample indices.

    The loader carries each sample's index in place of its label, so images it skips (corrupt,
    allow_corrupt=True) simply have no row.
    """
    indexed = [replace(s, label=i) for i, s in enumerate(samples)]
    with torch.inference_mode():
        for images, idx in loader_factory(indexed):
            with autocast():
                yield encode_images(images.to(device, non_blocking=True)), idx
