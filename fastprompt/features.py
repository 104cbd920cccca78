"""Image features computed once, in large batches, wherever the image encoder has no prompts.

For CoOp, CoCoOp, KgCoOp (and their DePT variants) the image encoder is frozen and unprompted,
so a training step only needs the image *features* of its augmented views, and evaluation only
needs the test images' features, which never change. Two exact speed-ups follow:

* `EpochImageFeatures`: the views of the next `steps_per_chunk` training steps are augmented in
  the loop's order with the loop's generator (the same random draws as step-by-step), then
  encoded in one no-grad batch under the run's autocast (bf16 on a GPU) instead of at the paper's
  batch of 4. The steps then run `model.forward_features`. PromptSRC prompts its image encoder
  but also compares with the frozen encoder's features of the same views: there the chunk keeps
  its views (`keep_views=True`), encodes them with `model.encode_frozen_images`, and each step
  runs `model(views, labels, frozen_image_features=...)`.
* `EvalFeatureCache`: test-image features cached on disk per backbone fingerprint (model name,
  weights digest, dtype, precision, image size, normalisation) and per image file (path, size,
  mtime), so base and new classes of one test split, every epoch, seed and method share them.

`configure_text` sets the text encoders' switches: chunked encoding (ImageNet-size class lists)
and truncation (off only for the official-style baseline).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

from .atomic_io import atomic_write_bytes

__all__ = ["uses_image_features", "uses_frozen_image_features", "EpochImageFeatures", "backbone_fingerprint",
           "EvalFeatureCache", "encode_samples", "features_accuracy", "text_encoders", "configure_text"]


def uses_image_features(model: nn.Module) -> bool:
    """True when the model's image features can be precomputed (frozen, unprompted image encoder)."""
    return hasattr(model, "forward_features") and getattr(model, "image_prompted", True) is False


def uses_frozen_image_features(model: nn.Module) -> bool:
    """True when the model's loss compares with the frozen image encoder's features of each step's
    views (PromptSRC): the loop can encode those in large no-grad batches (`EpochImageFeatures`
    with `encode=model.encode_frozen_images, keep_views=True`) and pass them to the step."""
    return bool(getattr(model, "needs_frozen_image_features", False))


class EpochImageFeatures:
    """Iterator over one epoch's steps `first..steps-1` yielding (image features, labels), or with
    `keep_views=True` (views, image features, labels): the views for a prompted image encoder, the
    features from `encode` (default `model.encode_images`; PromptSRC's frozen branch passes
    `model.encode_frozen_images`).

    `order` is the epoch's sample permutation; step i takes order[i*bs:(i+1)*bs] and keeps rows
    `part` of it (a DDP rank's share; all by default). Views are drawn by
    `augment(images, generator=generator)` one step batch at a time, in step order, exactly as
    the step-by-step loop draws them, then encoded `steps_per_chunk` steps at a time.
    `generator_state_after(i)` is the generator's state once step i's views were drawn (what an
    interrupted run saves to resume inside the epoch).
    """

    def __init__(self, model: nn.Module, source, augment: Callable, order: torch.Tensor, *, batch_size: int,
                 steps: int, steps_per_chunk: int, device: torch.device, generator: torch.Generator,
                 autocast: Callable, to_device: Callable, first: int = 0, part: slice = slice(None),
                 encode: Optional[Callable] = None, keep_views: bool = False):
        if steps_per_chunk < 1:
            raise ValueError(f"steps_per_chunk must be >= 1, got {steps_per_chunk}")
        self.model, self.source, self.augment, self.order = model, source, augment, order
        self.encode = encode if encode is not None else model.encode_images
        self.keep_views = keep_views
        self.bs, self.first, self.steps, self.per_chunk, self.part = batch_size, first, steps, steps_per_chunk, part
        self.device, self.generator, self.autocast, self.to_device = device, generator, autocast, to_device
        self._states: dict[int, torch.Tensor] = {}

    def generator_state_after(self, step: int) -> torch.Tensor:
        return self._states[step]

    def _chunk(self, first: int, count: int) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        views, labels = [], []
        self._states.clear()
        for i in range(first, first + count):
            images, y = self.source.batch(self.order[i * self.bs : (i + 1) * self.bs])
            views.append(self.augment(self.to_device(images, self.device), generator=self.generator)[self.part])
            labels.append(y.to(self.device, non_blocking=True)[self.part])
            self._states[i] = self.generator.get_state()
        views = torch.cat(views)
        with torch.no_grad(), self.autocast():
            features = self.encode(views)
        # Without keep_views the views go now (a chunk of them is large), as before this option.
        return (views if self.keep_views else None), features, torch.cat(labels)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for first in range(self.first, self.steps, self.per_chunk):
            count = min(self.per_chunk, self.steps - first)
            views, features, labels = self._chunk(first, count)
            rows = features.shape[0] // count
            for j in range(count):
                step = slice(j * rows, (j + 1) * rows)
                yield (views[step], features[step], labels[step]) if self.keep_views else (features[step], labels[step])


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
                self.root.mkdir(parents=True, exist_ok=True)
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


@torch.inference_mode()
def features_accuracy(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, *, device: torch.device,
                      autocast: Callable, batch_size: int, per_image_text: Optional[bool] = None) -> float:
    """Top-1 accuracy (%) of `model.forward_features` over cached features.

    Text features that do not depend on the image are the same for every batch, so those methods
    take large batches (one text encoding per 8192 images); CoCoOp's per-image prompts keep
    `batch_size`.
    """
    if per_image_text is None:
        per_image_text = getattr(model, "method", "").endswith("cocoop")
    step = batch_size if per_image_text else max(batch_size, 8192)
    model.eval()
    correct = 0
    for i in range(0, features.shape[0], step):
        x = features[i : i + step].to(device, non_blocking=True)
        y = labels[i : i + step].to(device, non_blocking=True)
        with autocast():
            logits = model.forward_features(x).logits
        correct += int((logits.argmax(dim=-1) == y).sum())
    return 100.0 * correct / max(features.shape[0], 1)


def text_encoders(model: nn.Module) -> list:
    """The TextEncoder modules a method runs (one per model; DePT's sits in its base method)."""
    from .encoders import TextEncoder

    found = [m for m in model.modules() if isinstance(m, TextEncoder)]
    return list({id(m): m for m in found}.values())


def configure_text(model: nn.Module, *, chunk_size: Optional[int] = None, truncate: bool = True) -> None:
    """Set every text encoder of `model`: prompts per chunk (None: all at once) and truncation."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"text chunk size must be a positive int or None, got {chunk_size!r}")
    for encoder in text_encoders(model):
        encoder.chunk_size = chunk_size
        encoder.truncate = truncate
