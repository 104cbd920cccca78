"""One method's training steps in one style, on synthetic images: what the benchmark times.

Both styles run fastprompt's `train_step`; they differ in what the step is given:
  fast: bf16 autocast over fp32 master weights, text truncated (and chunked past text_chunk_size
    prompts), augmentation on the device from decoded uint8 images (the training loop's
    EpochBatches); image features that need no gradient are encoded feature_batch images per
    no-grad batch (`steps_per_cycle` steps at a time; the loop's `step_forward`): methods with an
    unprompted image encoder step on features, PromptSRC steps on its views with the frozen
    encoder's features of them; optional torch.compile of the encoder trunks (fastprompt.compiled),
    with CUDA graphs on a GPU.
  official: fastprompt.official (fp16 eager, 77 tokens, CPU PIL decode + torchvision per step;
    PromptSRC's frozen image features by a second encoder pass in every step, as its code does).
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator, Optional

import torch

from ..compiled import compile_encoders
from ..config import OptimConfig
from ..data import GpuAugment
from ..fast_paths import configure_text, uses_frozen_image_features
from ..methods import build_model, depths_within
from ..official import CpuAugmentDataset, build_official_model, official_batches, official_train_loader, train_transform
from ..training import EpochBatches, Precision, build_optimizer, step_forward, train_step
from .synthetic import ImageSource, class_names, synthetic_images, synthetic_jpegs
from .timing import PhaseClock, sync

__all__ = ["STYLES", "method_options", "Stepper", "timed_steps"]

STYLES = ("fast", "official")


def method_options(method: str, clip) -> dict:
    """Published defaults, with prompt depths (text `depth`, IVLP's and PromptSRC's `vis_depth`)
    clipped to the towers' layers (the tiny model has 3)."""
    layers = min(len(clip.model.visual.transformer.resblocks), len(clip.model.transformer.resblocks))
    return depths_within(method, layers)


class Stepper:
    """`step()` runs one training step of `method` at `batch` images and `classes` classes.

    With a `clock`, the step's phases are recorded: data (batch fetch and augmentation, or the
    official loader), image_encoder and text_encoder (the model's encoders, wrapped), head (the rest
    of the forward), backward, optimizer.
    """

    def __init__(self, style: str, clip, method: str, batch: int, classes: int, *, device: torch.device,
                 feature_batch: int = 512, text_chunk_size: Optional[int] = None, compile: bool = False,
                 cuda_graphs: bool = False, num_workers: int = 0, seed: int = 0,
                 clock: Optional[PhaseClock] = None, precompute: bool = True):
        if style not in STYLES:
            raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
        self.style, self.batch, self.device, self.clock = style, batch, device, clock
        self.image_size = clip.image_size
        torch.manual_seed(seed)
        names = class_names(classes)
        if style == "official":
            self.model = build_official_model(method, clip, names, **method_options(method, clip))
        else:
            self.model = build_model(method, clip, names, **method_options(method, clip))
            configure_text(self.model, chunk_size=text_chunk_size)
        self.model.to(device).train()
        for p in self.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        self.optimizer = build_optimizer(self.model, OptimConfig())
        # The official style's fp16 is in its weights: no autocast, no loss scaling.
        self.precision = Precision("bf16" if style == "fast" else "fp32", device)
        if clock is not None:
            inner = getattr(self.model, "base", self.model)  # DePT: the base method computes the features
            inner.encode_images = clock.wrap(inner.encode_images, "image_encoder")
            inner.text_features = clock.wrap(inner.text_features, "text_encoder")
            if uses_frozen_image_features(inner):  # PromptSRC's frozen branch: a second image encoder
                inner.encode_frozen_images = clock.wrap(inner.encode_frozen_images, "frozen_image_encoder")
        # With `precompute`, the fast style encodes image features that need no gradient ahead, in
        # no-grad batches of feature_batch images (an unprompted encoder's, or PromptSRC's frozen
        # ones): the loop's rule under train.precompute_features.
        self.forward, self._features = self.model, None
        if style == "fast":
            self.forward, self._features = step_forward(self.model, self.model,
                                                        steps_per_chunk=max(1, feature_batch // batch),
                                                        autocast=self.precision.autocast,
                                                        image_features=precompute, frozen_image_features=precompute)
        self.precompute = self._features is not None
        self.steps_per_cycle = self._features.steps_per_chunk if self.precompute else 1
        if style == "official":
            n = max(batch * 4, 64)
            labels = torch.randint(0, classes, (n,)).tolist()
            jpegs = synthetic_jpegs(min(n, 256), clip.image_size, seed=seed)  # each access decodes anew
            dataset = CpuAugmentDataset([jpegs[i % len(jpegs)] for i in range(n)], labels, train_transform(clip))
            self.loader = official_train_loader(dataset, batch_size=batch, num_workers=num_workers, seed=seed)
            self._batches = self._official_batches()
        else:
            n = batch * self.steps_per_cycle
            images = synthetic_images(min(n, 1024), clip.image_size, seed=seed).to(device)
            self.source = ImageSource(images, classes, seed)
            self.augment = GpuAugment(clip.image_size, clip.mean, clip.std).to(device)
            if compile:
                compile_encoders(self.model, cuda_graphs=cuda_graphs)
            self._batches = self._fast_batches()

    def _fast_batches(self) -> Iterator:
        g = torch.Generator(device=self.device).manual_seed(1)
        n = self.source.images.shape[0]
        while True:
            order = torch.randperm(max(n, self.batch * self.steps_per_cycle))
            yield from EpochBatches(self.source, self.augment, order, batch_size=self.batch,
                                    steps=self.steps_per_cycle, device=self.device, generator=g,
                                    features=self._features)

    def _official_batches(self) -> Iterator:
        while True:
            yield from official_batches(self.loader, self.device)

    def _phase(self, name: str):
        return self.clock.phase(name) if self.clock is not None else contextlib.nullcontext()

    def step(self) -> torch.Tensor:
        with self._phase("data"):
            inputs, labels = next(self._batches)
        return train_step(self.forward, inputs, labels, self.optimizer, self.precision, phase=self._phase)

    def model_flops_per_step(self) -> float:
        """FLOPs of one step's model work (image encoder, text encoder, head, backward), as the fast
        path runs it: what the step needs, whatever a style wastes. Augmentation is not counted."""
        from torch.utils.flop_counter import FlopCounterMode

        size = self.image_size
        images = torch.randn(self.batch, 3, size, size, device=self.device)
        labels = torch.randint(0, self.model.num_classes, (self.batch,), device=self.device)
        counter = FlopCounterMode(display=False)
        with counter, torch.autocast(self.device.type, dtype=torch.bfloat16):
            if self.precompute and not self._features.keep_views:  # steps on image features
                with torch.no_grad():
                    features = self.model.encode_images(images)
                loss = self.model.forward_features(features, labels).loss
            else:  # PromptSRC: the model runs its frozen image encoder too (no grad)
                loss = self.model(images, labels).loss
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())


def timed_steps(stepper: Stepper, steps: int, device: torch.device) -> float:
    """Wall seconds of `steps` steps, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        stepper.step()
    sync(device)
    return time.perf_counter() - t0
