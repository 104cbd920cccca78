"""CoCoOp: CoOp plus a Meta-Net that shifts the context by a token computed from each image."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastprompt.clip import ClipBundle

from .coop import CoOp


class CoCoOp(CoOp):
    method = "cocoop"
    DEFAULTS = {"n_ctx": 4, "ctx_init": "a photo of a", "ctx_std": 0.02, "meta_net_reduction": 16}
    text_depends_on_image = True

    def __init__(self, clip: ClipBundle, classnames: Sequence[str], *, meta_net_reduction: int, **options):
        super().__init__(clip, classnames, **options)
        if not 1 <= meta_net_reduction <= self.embed_dim:
            raise ValueError(f"meta_net_reduction must be in [1, {self.embed_dim}], got {meta_net_reduction}")
        hidden = self.embed_dim // meta_net_reduction
        # Linear(d -> d/16) - ReLU - Linear(d/16 -> text width), on the normalised image feature.
        self.meta_net = nn.Sequential(
            nn.Linear(self.embed_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, self.text_encoder.width)
        ).to(self.text_prompts.ctx.device)

    def text_features(self, image_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        if image_features is None:
            raise ValueError("CoCoOp's text features depend on the image: pass image_features [B, d]")
        shift = self.meta_net(F.normalize(image_features.float(), dim=-1))  # [B, W]
        return self.text_prompts.encode(self.text_encoder, shift=shift)  # [B, C, d]
