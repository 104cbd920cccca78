"""One epoch's training batches, on the device: augmented images, or their image features.

Every rank draws the same sample order and the same augmentation (the same seeded generator) for
the whole global batch and keeps its slice `part`: cheap next to the forward, and exact (the same
draws as one process).

Where the image encoder is frozen and unprompted (CoOp, CoCoOp, KgCoOp and their DePT variants) a
step only needs the image *features* of its augmented views. Then the views of `steps_per_chunk`
steps are drawn in step order with the same generator (the same random draws as step by step) and
encoded in one no-grad batch under the run's autocast instead of at the paper's batch of 4; the
steps run the model's `forward_features`. Same views, same result, far fewer small encoder calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol

import torch

__all__ = ["BatchSource", "FeatureEncoding", "EpochBatches", "steps_per_epoch", "to_device"]


class BatchSource(Protocol):
    """Where training images come from (fastprompt.data.TrainImageCache satisfies it)."""

    labels: torch.Tensor

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class FeatureEncoding:
    """Encode the views of `steps_per_chunk` steps at a time with `encode_images` under `autocast`.

    `keep_views`: the steps get (views, features) instead of the features alone: PromptSRC prompts
    its image encoder but compares with the frozen encoder's features of the same views, which
    `encode_images=model.encode_frozen_images` computes here in one no-grad batch per chunk."""

    encode_images: Callable[[torch.Tensor], torch.Tensor]
    steps_per_chunk: int
    autocast: Callable
    keep_views: bool = False

    def __post_init__(self):
        if self.steps_per_chunk < 1:
            raise ValueError(f"steps_per_chunk must be >= 1, got {self.steps_per_chunk}")


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    # Dassl drops the last incomplete batch; a set smaller than one batch still gives one step.
    return max(1, num_samples // batch_size)


def to_device(images, device: torch.device):
    """The image cache returns one tensor, or a list when the decoded images differ in size."""
    if isinstance(images, torch.Tensor):
        return images.to(device, non_blocking=True)
    return [im.to(device, non_blocking=True) for im in images]


class EpochBatches:
    """Iterator over steps `first..steps-1` of one epoch, yielding (inputs, labels) on `device`.

    Step i takes the samples order[i*bs:(i+1)*bs], augments them with `augment(images,
    generator=generator)` and keeps rows `part`. With `features` the inputs are the views' image
    features. `generator_state_after(i)` is the generator's state once step i's views were drawn
    (what an interrupted run saves to resume inside the epoch).
    """

    def __init__(self, source: BatchSource, augment: Callable, order: torch.Tensor, *, batch_size: int, steps: int,
                 device: torch.device, generator: torch.Generator, first: int = 0, part: slice = slice(None),
                 features: Optional[FeatureEncoding] = None):
        self.source, self.augment, self.order = source, augment, order
        self.bs, self.steps, self.first, self.part = batch_size, steps, first, part
        self.device, self.generator, self.features = device, generator, features
        self._states: dict[int, torch.Tensor] = {}

    def generator_state_after(self, step: int) -> torch.Tensor:
        return self._states[step]

    def _views(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.source.batch(self.order[step * self.bs : (step + 1) * self.bs])
        views = self.augment(to_device(images, self.device), generator=self.generator)[self.part]
        self._states[step] = self.generator.get_state()
        return views, labels.to(self.device, non_blocking=True)[self.part]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.features is None:
            for i in range(self.first, self.steps):
                self._states.clear()
                yield self._views(i)
            return
        per_chunk = self.features.steps_per_chunk
        for first in range(self.first, self.steps, per_chunk):
            count = min(per_chunk, self.steps - first)
            self._states.clear()
            views, labels = zip(*(self._views(i) for i in range(first, first + count)))
            views = torch.cat(views)
            with torch.no_grad(), self.features.autocast():
                encoded = self.features.encode_images(views)
            if not self.features.keep_views:
                del views  # a chunk of views is large: only the features stay
            labels = torch.cat(labels)
            rows = encoded.shape[0] // count
            for j in range(count):
                step = slice(j * rows, (j + 1) * rows)
                inputs = (views[step], encoded[step]) if self.features.keep_views else encoded[step]
                yield inputs, labels[step]
