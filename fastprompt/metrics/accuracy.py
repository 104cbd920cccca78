"""Top-1 accuracy of a model on test images, with the model's current class names.

Under torchrun each rank tests every world_size-th image and the counts are summed. Models whose
image encoder is unprompted score cached test-image features (fastprompt.metrics.feature_cache):
encoded once per backbone, then reused by every epoch, seed, method and class list (base and new).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .. import distributed
from ..config import Config
from ..data import eval_loader
from ..errors import DatasetError
from ..fast_paths import uses_image_features
from ..training.precision import autocast_context
from ..training.run_log import progress_bar
from .feature_cache import EvalFeatureCache, backbone_fingerprint, encode_samples

__all__ = ["Evaluator", "features_accuracy"]


class Evaluator:
    """How one command scores test images: the backbone's preprocessing, the device and precision,
    the evaluation loader's settings, and (when `feature_cache_dir` is set) the test-feature cache."""

    def __init__(self, clip, device: torch.device, *, precision: str, batch_size: int, num_workers: int,
                 allow_corrupt: bool, progress: bool, feature_cache_dir: Optional[Path] = None):
        self.clip, self.device, self.precision = clip, device, precision
        self.batch_size, self.num_workers, self.allow_corrupt, self.progress = (batch_size, num_workers,
                                                                                allow_corrupt, progress)
        self.feature_cache_dir = feature_cache_dir
        self.feature_cache: Optional[EvalFeatureCache] = None  # made on first use (hashes the weights)

    @classmethod
    def from_config(cls, cfg: Config, clip, device: torch.device, feature_cache_dir: Path) -> "Evaluator":
        return cls(clip, device, precision=cfg.train.precision, batch_size=cfg.train.eval_batch_size,
                   num_workers=cfg.train.num_workers, allow_corrupt=cfg.data.allow_corrupt,
                   progress=cfg.train.progress,
                   feature_cache_dir=feature_cache_dir if cfg.train.feature_cache else None)

    def loader(self, samples: list):
        return eval_loader(samples, image_size=self.clip.image_size, mean=self.clip.mean, std=self.clip.std,
                           batch_size=self.batch_size, num_workers=self.num_workers,
                           allow_corrupt=self.allow_corrupt, pin_memory=self.device.type == "cuda")

    def autocast(self):
        return autocast_context(self.device, self.precision)

    @torch.inference_mode()
    def accuracy(self, model: nn.Module, samples: list, *, desc: str = "eval") -> tuple[float, float]:
        """Top-1 accuracy in percent over `samples`, and images/s."""
        if self.feature_cache_dir is not None and uses_image_features(model) and not distributed.is_distributed():
            return self._cached_accuracy(model, samples)
        loader = self.loader(distributed.shard(samples))
        model.eval()
        correct = seen = 0
        start = time.perf_counter()
        with progress_bar(self.progress, total=len(samples), desc=desc) as bar:
            for images, labels in loader:
                images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                with self.autocast():
                    logits = model(images).logits
                correct += int((logits.argmax(dim=-1) == labels).sum())
                seen += labels.numel()
                bar.update(labels.numel() * distributed.world_size())
        counts = distributed.all_reduce_sum(torch.tensor([correct, seen], dtype=torch.float64, device=self.device))
        correct, seen = int(counts[0]), int(counts[1])
        if seen == 0:
            raise unreadable_test_set(desc, samples)
        return 100.0 * correct / seen, seen / max(time.perf_counter() - start, 1e-9)

    def _cached_accuracy(self, model: nn.Module, samples: list) -> tuple[float, float]:
        start = time.perf_counter()
        if self.feature_cache is None:
            self.feature_cache = EvalFeatureCache(self.feature_cache_dir,
                                                  backbone_fingerprint(self.clip, self.precision))
        encode = lambda missing: encode_samples(model.encode_images, missing, loader_factory=self.loader,  # noqa: E731
                                                device=self.device, autocast=self.autocast)
        features, labels = self.feature_cache.features(encode, samples)
        if labels.numel() == 0:
            raise unreadable_test_set("test", samples)
        acc = features_accuracy(model, features, labels, device=self.device, autocast=self.autocast,
                                batch_size=self.batch_size)
        return acc, labels.numel() / max(time.perf_counter() - start, 1e-9)


def unreadable_test_set(desc: str, samples: list) -> DatasetError:
    folder = os.path.commonpath([os.path.dirname(os.path.abspath(s.path)) for s in samples]) if samples else "?"
    return DatasetError(f"{desc}: none of the {len(samples)} test images under {folder} could be read "
                        "(data.allow_corrupt=true skipped them all); replace the unreadable files, or point "
                        "data.root at a copy that decodes")


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
