"""KgCoOp: CoOp whose class text features are pulled towards the hand-crafted prompt's features:
loss += w * (1 - mean_c cos(f_T_c, f_T_c^handcrafted))."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fastprompt.clip import ClipBundle

from .coop import CoOp
from .templates import GENERIC_TEMPLATE
from .zsclip import encode_template


class KgCoOp(CoOp):
    method = "kgcoop"
    DEFAULTS = {"n_ctx": 4, "ctx_init": "a photo of a", "ctx_std": 0.02, "kg_weight": 8.0, "template": GENERIC_TEMPLATE}

    def __init__(self, clip: ClipBundle, classnames: Sequence[str], *, kg_weight: float, template: str, **options):
        super().__init__(clip, classnames, **options)
        if kg_weight < 0:
            raise ValueError(f"kg_weight must be >= 0, got {kg_weight}")
        self.kg_weight = float(kg_weight)
        self.template = template
        self._encode_handcrafted()

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self._encode_handcrafted()

    def _encode_handcrafted(self) -> None:
        features = encode_template(self, self.template, self.classnames)
        self.register_buffer("handcrafted_features", features, persistent=False)

    def regularizer(self, text_features: torch.Tensor, **_features) -> torch.Tensor:
        # Only the text features are regularised (the image features are ignored).
        cos = F.cosine_similarity(text_features.float(), self.handcrafted_features, dim=-1)
        return self.kg_weight * (1.0 - cos.mean())
