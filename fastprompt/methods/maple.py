"""MaPLe: deep multi-modal prompts. n_ctx language context tokens in the first `depth` text
layers; each layer's visual prompts are a linear projection of that layer's language prompts,
appended after the image patches."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastprompt.clip import ClipBundle

from .base import PromptedCLIP, check_classnames
from .prompts import CoupledVisionPrompts, TextPrompts, layer_list


class MaPLe(PromptedCLIP):
    method = "maple"
    image_prompted = True
    DEFAULTS = {"n_ctx": 2, "ctx_init": "a photo of a", "ctx_std": 0.02, "depth": 9}

    def __init__(
        self,
        clip: ClipBundle,
        classnames: Sequence[str],
        *,
        n_ctx: Optional[int],
        ctx_init: Optional[str],
        ctx_std: float,
        depth: int,
        attention_backend: str = "auto",
    ):
        super().__init__(clip, attention_backend=attention_backend)
        self.classnames = check_classnames(classnames)
        self.text_prompts = TextPrompts(
            self.text_encoder, self.tokenizer, self.classnames,
            n_ctx=n_ctx, ctx_init=ctx_init, ctx_std=ctx_std, depth=depth,
        )
        self.vision_prompts = CoupledVisionPrompts(
            self.text_prompts, self.text_encoder.width, self.image_encoder.width, self.image_encoder.num_layers
        )

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = check_classnames(classnames)
        self.text_prompts.set_classnames(self.text_encoder, self.tokenizer, self.classnames)

    def text_features(self, image_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.text_prompts.encode(self.text_encoder)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.vision_prompts.layers(self.text_prompts)
        return self.image_encoder(
            images, prompts=visual[0], prompt_position="append",
            deep_prompts=layer_list(visual, self.image_encoder.num_layers),
        )
