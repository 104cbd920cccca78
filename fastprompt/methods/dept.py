"""DePT: the CAT head (Channel Adjusted Transfer) trained beside any prompt method's ITM head.

Training: (1 - lam) CE(z_ITM, y) + lam CE(z_CAT, [y; y]) over the 2B-row batch of each
sample's true-class text feature and its image feature, both channel-wise transformed
(gamma * f + beta) before a linear classifier; plus the base method's own regulariser.
Inference on the training classes fuses (1 - lam) z_ITM + lam z_CAT(image) (or CAT alone);
on any other class list (new classes, other datasets) only the ITM head applies, unless
`cat_head_rows` maps the classes to classifier rows (ImageNet-A/-R: 200 of the 1000).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from fastprompt.kernels import reference as reference_ops
from fastprompt.kernels.reference import itm_logits

from ..backends import HEAD_BACKENDS, head_backend_for
from .base import ModelOutput, PromptedCLIP, PromptModel


def _head_ops(backend: str):
    if backend == "triton":
        # Lazy: the Triton kernels need a GPU or TRITON_INTERPRET=1.
        from fastprompt.kernels import cat_head

        return cat_head
    return reference_ops


class _LazyLogitsOutput(ModelOutput):
    """A training step's output: the loss now, the (reported-only) logits computed on first access."""

    def __init__(self, loss: torch.Tensor, compute_logits):
        self.loss = loss
        self._compute_logits = compute_logits
        self._logits: Optional[torch.Tensor] = None

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = self._compute_logits()
            self._compute_logits = None
        return self._logits


class DePT(PromptModel):
    DEFAULTS = {"lam": 0.7, "head_backend": "auto", "fuse": True}

    def __init__(self, base: PromptedCLIP, *, lam: float, head_backend: str, fuse: bool):
        super().__init__()
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be a float in [0, 1] (the CAT head's share), got {lam!r}")
        if head_backend not in HEAD_BACKENDS:
            raise ValueError(f"head_backend={head_backend!r} must be one of {', '.join(HEAD_BACKENDS)}")
        self.base = base
        self.method = f"dept+{base.method}"
        self.image_prompted = base.image_prompted
        self.needs_frozen_image_features = base.needs_frozen_image_features
        self.gpa_settings = base.gpa_settings  # GPA aggregates the head with the prompts
        self.embed_dim = base.embed_dim
        self.lam, self.fuse, self.head_backend = float(lam), bool(fuse), head_backend
        d = base.embed_dim
        device = next(base.text_encoder.parameters()).device
        # gamma init 1, beta init 0: the head starts as a plain linear probe of the raw features.
        self.gamma_img = nn.Parameter(torch.ones(d, device=device))
        self.beta_img = nn.Parameter(torch.zeros(d, device=device))
        self.gamma_txt = nn.Parameter(torch.ones(d, device=device))
        self.beta_txt = nn.Parameter(torch.zeros(d, device=device))
        self.classifier = nn.Linear(d, base.num_classes, device=device)
        self.train_classnames: List[str] = list(base.classnames)
        self.register_buffer("cat_rows", None, persistent=False)  # classifier rows of the current classes
        self.cat_head_active = True

    @property
    def classnames(self) -> List[str]:
        return self.base.classnames

    def set_classnames(self, classnames: Sequence[str], cat_head_rows: Optional[Sequence[int]] = None) -> None:
        """Switch classes. The CAT head applies to the training classes, or to the classifier rows
        `cat_head_rows` (one per class, e.g. ImageNet-A's 200 of ImageNet's 1000); else ITM only."""
        if cat_head_rows is not None:  # checked before anything switches
            rows = [int(r) for r in cat_head_rows]
            c_train = len(self.train_classnames)
            bad = [r for r in rows if not 0 <= r < c_train]
            if len(rows) != len(classnames) or bad:
                raise ValueError(
                    f"cat_head_rows must give one classifier row in [0, {c_train}) per class: "
                    f"{len(classnames)} classes, {len(rows)} rows" + (f", out of range: {bad[:8]}" if bad else "")
                )
        self.base.set_classnames(classnames)
        names = self.base.classnames
        if cat_head_rows is not None:
            self.cat_rows = torch.tensor(rows, dtype=torch.long, device=self.classifier.weight.device)
            self.cat_head_active = True
        else:
            self.cat_rows = None
            self.cat_head_active = names == self.train_classnames

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.base.encode_images(images)

    def encode_frozen_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.base.encode_frozen_images(images)

    def _classifier(self):
        w, b = self.classifier.weight, self.classifier.bias
        if self.cat_rows is not None:
            return w[self.cat_rows], b[self.cat_rows]
        return w, b

    def head(
        self, image_features: torch.Tensor, labels: Optional[torch.Tensor], *,
        frozen_image_features: Optional[torch.Tensor] = None,
    ) -> ModelOutput:
        base = self.base
        text_features = base.cached_text_features(image_features)
        features = dict(image_features=image_features, frozen_image_features=frozen_image_features)
        if not self.cat_head_active:  # new classes: the CAT classifier knows only the base classes
            logits = itm_logits(image_features.float(), text_features.float(), base.logit_scale)
            loss = None if labels is None else base.itm_loss(logits, text_features, labels, **features)
            return ModelOutput(logits=logits, loss=loss)

        ops = _head_ops(head_backend_for(self.head_backend, image_features))
        weight, bias = self._classifier()
        head = dict(gamma_img=self.gamma_img, beta_img=self.beta_img, weight=weight, bias=bias, logit_scale=base.logit_scale, lam=self.lam)
        if labels is None:
            return ModelOutput(logits=ops.cat_head_logits(image_features, text_features, fuse=self.fuse, **head))
        self.check_labels(labels, image_features.shape[0])
        if self.cat_rows is not None:
            raise ValueError("train DePT on the classes its head was built for (set_classnames without cat_head_rows)")
        loss = ops.cat_head_loss(image_features, text_features, labels, gamma_txt=self.gamma_txt, beta_txt=self.beta_txt, **head)
        # The base method's own terms, unchanged (KgCoOp's anchor, PromptSRC's KL and L1 terms).
        extra = base.regularizer(text_features, **features)
        if extra is not None:
            loss = loss + extra
        # The training step reads only the loss: the inference logits are computed if and when they are read.
        img, txt = image_features.detach(), text_features.detach()

        def logits():
            with torch.no_grad():
                return ops.cat_head_logits(img, txt, fuse=self.fuse, **head)

        return _LazyLogitsOutput(loss, logits)

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        groups = {}
        prompt = [p for p in self.base.parameters() if p.requires_grad]
        if prompt:
            groups["prompt"] = prompt
        groups["head"] = [self.gamma_img, self.beta_img, self.gamma_txt, self.beta_txt, *self.classifier.parameters()]
        return groups
