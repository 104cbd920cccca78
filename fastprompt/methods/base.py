"""What every prompt method shares: the frozen encoders, class-name prompts, the ITM head, and a
state dict that holds only what trains."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastprompt.clip import ClipBundle
from fastprompt.errors import ClassNamesError
from fastprompt.encoders import ImageEncoder, TextEncoder
from fastprompt.kernels.reference import itm_logits

__all__ = ["ModelOutput", "PromptModel", "PromptedCLIP", "check_classnames"]


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, C] float32, the method's inference logits
    loss: Optional[torch.Tensor] = None  # the full training objective, when labels were given


def check_classnames(classnames: Sequence[str]) -> List[str]:
    """The class names as prompts spell them ('_' reads as a space); a name given twice is refused:
    two classes with one prompt get identical logits and one of them can never be predicted."""
    if isinstance(classnames, str) or not isinstance(classnames, Sequence) or len(classnames) == 0:
        raise ValueError("classnames must be a non-empty list of class-name strings")
    bad = [c for c in classnames if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ValueError(f"classnames must be non-empty strings, got {bad[:3]}")
    names = [" ".join(c.replace("_", " ").split()) for c in classnames]
    first = {}
    for i, name in enumerate(names):
        if name in first:
            j = first[name]
            raise ClassNamesError(f"classnames {classnames[j]!r} (position {j}) and {classnames[i]!r} (position {i}) are "
                             f"the same class name {name!r}; give every class its own name")
        first[name] = i
    return names


class PromptModel(nn.Module, ABC):
    """What the training loop and evaluation use, whatever the method.

    Images are normalised float [B, 3, S, S]; features are raw (not normalised) [B, d].
    """

    method: str = "base"
    image_prompted: bool = False  # does the image encoder depend on trainable parameters?
    # Does the training loss compare with the frozen image encoder's features of the same views
    # (PromptSRC)? Then forward() takes them as `frozen_image_features`, or computes them.
    needs_frozen_image_features: bool = False
    # Gaussian prompt aggregation over epochs, (mean, std) in 1-based epochs, or None (fastprompt.methods.gpa).
    gpa_settings: Optional[Tuple[float, float]] = None
    embed_dim: int
    classnames: List[str]

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> raw image features [B, d]."""

    @abstractmethod
    def head(
        self, image_features: torch.Tensor, labels: Optional[torch.Tensor], *,
        frozen_image_features: Optional[torch.Tensor] = None,
    ) -> ModelOutput:
        """Logits [B, C] for the current classes, and the training loss when labels are given.

        frozen_image_features [B, d]: the unprompted image encoder's raw features of the same
        images (only for methods with `needs_frozen_image_features`)."""

    def encode_frozen_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> the frozen, unprompted image encoder's raw features [B, d], no grad."""
        raise NotImplementedError(f"{self.method} has no frozen image branch")

    @abstractmethod
    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Switch the classes (base -> new -> another dataset) without rebuilding the model."""

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def forward(
        self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
        frozen_image_features: Optional[torch.Tensor] = None,
    ) -> ModelOutput:
        """images [B, 3, S, S] -> ModelOutput; with labels [B] the loss too.

        frozen_image_features [B, d] (methods with `needs_frozen_image_features`, training only):
        the unprompted image encoder's raw features of these very images, e.g. computed for many
        steps in one no-grad batch; when not given, the model computes them (no grad)."""
        if frozen_image_features is not None:
            self.check_frozen_image_features(frozen_image_features, images.shape[0])
        if not self.needs_frozen_image_features:
            return self.head(self.encode_images(images), labels)
        if labels is not None and frozen_image_features is None:
            frozen_image_features = self.encode_frozen_images(images)
        return self.head(self.encode_images(images), labels, frozen_image_features=frozen_image_features)

    def check_frozen_image_features(self, features: torch.Tensor, batch: int) -> None:
        if not self.needs_frozen_image_features:
            raise ValueError(f"{self.method} does not use frozen image features; call it without frozen_image_features")
        is_tensor = isinstance(features, torch.Tensor)
        if not is_tensor or not features.is_floating_point() or features.shape != (batch, self.embed_dim):
            got = tuple(features.shape) if is_tensor else type(features).__name__
            raise ValueError(
                f"frozen_image_features must be a float tensor [{batch}, {self.embed_dim}] (the frozen image "
                f"encoder's features of the same {batch} images), got {got}"
            )

    def forward_features(self, image_features: torch.Tensor, labels: Optional[torch.Tensor] = None) -> ModelOutput:
        """The same as forward, from precomputed image features (methods with an unprompted image encoder)."""
        if self.image_prompted:
            raise ValueError(f"{self.method} prompts the image encoder: its image features cannot be precomputed")
        if image_features.ndim != 2 or image_features.shape[1] != self.embed_dim:
            raise ValueError(f"image_features must have shape [B, {self.embed_dim}], got {tuple(image_features.shape)}")
        return self.head(image_features, labels)

    def check_labels(self, labels: torch.Tensor, batch: int) -> None:
        if labels.shape != (batch,) or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be an int64 tensor of shape [{batch}], got {labels.dtype} {tuple(labels.shape)}")

    # --- training plumbing ---------------------------------------------------------------------
    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        """Trainable parameters by optimiser group ("prompt"; DePT adds "head")."""
        params = [p for p in self.parameters() if p.requires_grad]
        return {"prompt": params} if params else {}

    def _trainable_names(self) -> List[str]:
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Only what trains: the frozen CLIP is never saved (it comes from its own checkpoint)."""
        full = super().state_dict(destination=None, prefix="", keep_vars=keep_vars)
        keep = OrderedDict((prefix + k, full[k]) for k in self._trainable_names())
        if destination is not None:
            destination.update(keep)
            return destination
        return keep

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = dict(self.named_parameters())
        expected = set(self._trainable_names())
        given = set(state_dict)
        if strict and given != expected:
            missing, unexpected = sorted(expected - given), sorted(given - expected)
            raise ValueError(
                f"state dict does not match {self.method}'s trainable parameters: missing {missing[:8]}, "
                f"unexpected {unexpected[:8]} (was it saved from another method?)"
            )
        wrong = [f"{k} {tuple(v.shape)} (here {tuple(own[k].shape)})" for k, v in state_dict.items()
                 if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if wrong:
            raise ValueError(
                f"state dict shapes do not match {self.method}: {', '.join(wrong[:4])}; was it saved with "
                "another class count, number of context tokens or depth?"
            )
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        # The frozen CLIP is never in these state dicts: report only the trainable keys.
        return type(result)([k for k in result.missing_keys if k in expected], result.unexpected_keys)


class PromptedCLIP(PromptModel):
    """A prompt method computed by CLIP's own encoders and image-text matching (ITM) head.

    Subclasses provide `text_features(image_features)` ([C, d], or [B, C, d] when the prompts
    depend on the image), may override `encode_images` (prompted image encoder) and
    `regularizer(text_features, ...)` (extra loss terms).
    """

    def __init__(self, clip: ClipBundle, *, attention_backend: str = "auto"):
        super().__init__()
        self.image_encoder = ImageEncoder(clip.model, attention_backend)
        self.text_encoder = TextEncoder(clip.model, attention_backend)
        self.tokenizer = clip.tokenizer
        self.embed_dim = clip.embed_dim
        self.logit_scale = clip.logit_scale
        self.classnames = []

    @abstractmethod
    def text_features(self, image_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Raw class text features: [C, d], or [B, C, d] when the prompts depend on the image."""

    text_depends_on_image = False  # CoCoOp: the prompts take a token from each image

    def cached_text_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """`text_features`, computed once per evaluation: with no gradient, the same classes and
        template and unchanged trainable parameters (their in-place versions, so an optimiser step
        or a load_state_dict counts), every batch would encode the same class prompts again."""
        if self.text_depends_on_image or torch.is_grad_enabled():
            return self.text_features(image_features)
        key = (tuple(self.classnames), getattr(self, "template", None),
               tuple((id(p), p._version, p.device) for p in self.parameters() if p.requires_grad))
        cached = self.__dict__.get("_text_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.text_features(image_features))
            self.__dict__["_text_cache"] = cached  # a plain attribute: never in the state dict
        return cached[1]

    def regularizer(
        self, text_features: torch.Tensor, *, image_features: Optional[torch.Tensor] = None,
        frozen_image_features: Optional[torch.Tensor] = None,
    ) -> Optional[torch.Tensor]:
        """Extra training loss terms (None: cross-entropy only), from the raw text features [C, d]
        (or [B, C, d]), the raw (prompted) image features [B, d] and the frozen ones [B, d]."""
        return None

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(images)

    def encode_frozen_images(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.image_encoder(images)

    def head(
        self, image_features: torch.Tensor, labels: Optional[torch.Tensor], *,
        frozen_image_features: Optional[torch.Tensor] = None,
    ) -> ModelOutput:
        text_features = self.cached_text_features(image_features)
        logits = itm_logits(image_features.float(), text_features.float(), self.logit_scale)
        if labels is None:
            return ModelOutput(logits=logits)
        loss = self.itm_loss(logits, text_features, labels, image_features=image_features,
                             frozen_image_features=frozen_image_features)
        return ModelOutput(logits=logits, loss=loss)

    def itm_loss(
        self, logits: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor, *,
        image_features: Optional[torch.Tensor] = None, frozen_image_features: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Cross-entropy on the ITM logits plus the method's regulariser."""
        self.check_labels(labels, logits.shape[0])
        try:
            loss = F.cross_entropy(logits, labels.long())
        except IndexError:  # a label outside [0, C) (on the CPU; checking first would cost a device sync)
            c = logits.shape[1]
            raise ValueError(f"labels must lie in [0, {c}) for C={c} classes; got min {int(labels.min())}, "
                             f"max {int(labels.max())}") from None
        extra = self.regularizer(
            text_features, image_features=image_features, frozen_image_features=frozen_image_features
        )
        return loss if extra is None else loss + extra

    def train(self, mode: bool = True):
        super().train(mode)
        # The backbone stays in eval mode whatever the method does (dropout, patch dropout off).
        self.image_encoder.eval()
        self.text_encoder.eval()
        return self
