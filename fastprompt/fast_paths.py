"""The model-side switches of fastprompt's exact speed-ups.

* `configure_text`: how a model's text encoders run: at most `chunk_size` class prompts at once
  (ImageNet-size class lists, checkpointed), and cut at the longest end-of-text token (off only for
  the official-style baseline, which runs all 77 positions).
* `uses_image_features`: whether a model's image features can be computed apart from its training
  step (a frozen, unprompted image encoder): the training loop then encodes each epoch's views in
  large no-grad batches, and evaluation caches test-image features on disk.

torch.compile of the encoders is the third switch (fastprompt.compiled).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .encoders import TextEncoder

__all__ = ["uses_image_features", "uses_frozen_image_features", "text_encoders", "configure_text"]


def uses_image_features(model: nn.Module) -> bool:
    """True when the model's image features can be precomputed (frozen, unprompted image encoder)."""
    return hasattr(model, "forward_features") and getattr(model, "image_prompted", True) is False


def uses_frozen_image_features(model: nn.Module) -> bool:
    """True when the model's loss compares with the frozen image encoder's features of each step's
    views (PromptSRC): the loop can encode those in large no-grad batches (`FeatureEncoding` with
    `encode_images=model.encode_frozen_images, keep_views=True`) and pass them to the step."""
    return bool(getattr(model, "needs_frozen_image_features", False))


def text_encoders(model: nn.Module) -> list:
    """The TextEncoder modules a method runs (one per model; DePT's sits in its base method)."""
    found = [m for m in model.modules() if isinstance(m, TextEncoder)]
    return list({id(m): m for m in found}.values())


def configure_text(model: nn.Module, *, chunk_size: Optional[int] = None, truncate: bool = True) -> None:
    """Set every text encoder of `model`: prompts per chunk (None: all at once) and truncation."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"text chunk size must be a positive int or None, got {chunk_size!r}")
    for encoder in text_encoders(model):
        encoder.chunk_size = chunk_size
        encoder.truncate = truncate
