"""One training step, the same for the loop (`fit`), the benchmark and the official-style baseline.

Forward under the run's precision, backward, optional gradient clipping, optimiser update. The
benchmark times the step's phases through the `phase` hook ("head": the forward, of which the
encoders' own time is recorded by their wrappers as nested phases; "backward"; "optimizer");
everywhere else the hook records nothing.

`step_forward` chooses what a step is given for a model (its images, their precomputed image
features, or its images with the frozen encoder's features of them), for `fit` and the benchmark alike.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Iterable, Optional

import torch
from torch import nn

from ..fast_paths import uses_frozen_image_features, uses_image_features
from .batches import FeatureEncoding
from .precision import Precision

__all__ = ["train_step", "step_forward", "no_phase", "PHASES"]

PHASES = ("head", "backward", "optimizer")


def no_phase(name: str) -> ContextManager:
    return nullcontext()


def train_step(
    forward: Callable,
    inputs,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    *,
    grad_clip: Optional[float] = None,
    params: Optional[Iterable[torch.Tensor]] = None,
    phase: Callable[[str], ContextManager] = no_phase,
) -> torch.Tensor:
    """Train on one batch; returns the (detached) loss.

    forward(inputs, labels) returns an object with `.loss` (a model, or its `forward_features` when
    `inputs` are precomputed image features); `params` are what `grad_clip` clips (max norm).
    """
    with phase("head"), precision.autocast():
        loss = forward(inputs, labels).loss
    with phase("backward"):
        precision.backward(loss, optimizer)
    with phase("optimizer"):
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(params), grad_clip)
        precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def step_forward(model: nn.Module, forward: Callable, *, steps_per_chunk: int, autocast: Callable,
                 image_features: bool = True, frozen_image_features: bool = True
                 ) -> tuple[Callable, Optional[FeatureEncoding]]:
    """What the steps of `model` run (`train_step`'s forward) and how EpochBatches encodes their views.

    `forward` is the model or its DDP wrapper. Whatever is encoded ahead, it is the same views'
    features, computed without gradient for `steps_per_chunk` steps at a time under `autocast`:

    * `image_features` and a frozen, unprompted image encoder (CoOp, CoCoOp, KgCoOp, +DePT): the
      steps run `model.forward_features` on the views' image features (the model's own method, so
      not through a DDP wrapper: callers switch it off in distributed runs);
    * `frozen_image_features` and a loss that compares with the frozen encoder's features of the
      same views (PromptSRC, +DePT): the steps get (views, f0) and run
      `forward(views, labels, frozen_image_features=f0)`, through the wrapper, so also under DDP;
    * otherwise `forward` on the views: the model computes all it needs itself.
    """
    if image_features and uses_image_features(model):
        return model.forward_features, FeatureEncoding(model.encode_images, steps_per_chunk, autocast)
    if frozen_image_features and uses_frozen_image_features(model):
        def with_frozen_features(inputs, labels):
            views, frozen = inputs
            return forward(views, labels, frozen_image_features=frozen)

        return with_frozen_features, FeatureEncoding(model.encode_frozen_images, steps_per_chunk, autocast,
                                                     keep_views=True)
    return forward, None
