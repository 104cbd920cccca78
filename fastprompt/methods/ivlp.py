"""IVLP (independent vision-language prompting): deep text prompts and deep vision prompts, learned
independently of each other (no coupling, unlike MaPLe). PromptSRC's prompt architecture.

* Text (CoOp's prompts, made deep): n_ctx context vectors at token positions 1..n_ctx of
  "<ctx> <class name>.", initialised from the phrase `ctx_init` ("a photo of a"); before text
  blocks 1..depth-1 a fresh set of n_ctx vectors, N(0, 0.02), replaces them.
* Vision: n_vis_ctx tokens, N(0, 0.02), appended after CLS and the patches (after the positional
  embedding, before ln_pre); before vision blocks 1..vis_depth-1 a fresh set replaces them. The
  image feature is CLIP's pooled CLS token: the prompt tokens never reach the output directly.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastprompt.clip import ClipBundle

from .coop import CoOp
from .prompts import VisionPrompts, layer_list


class IVLP(CoOp):
    method = "ivlp"
    image_prompted = True
    DEFAULTS = {"n_ctx": 4, "ctx_init": "a photo of a", "ctx_std": 0.02, "depth": 9, "n_vis_ctx": 4, "vis_depth": 9}

    def __init__(
        self, clip: ClipBundle, classnames: Sequence[str], *, n_ctx: Optional[int], ctx_init: Optional[str],
        ctx_std: float, depth: int, n_vis_ctx: int, vis_depth: int, attention_backend: str = "auto",
    ):
        super().__init__(clip, classnames, n_ctx=n_ctx, ctx_init=ctx_init, ctx_std=ctx_std, depth=depth,
                         attention_backend=attention_backend)
        self.vision_prompts = VisionPrompts(
            n_vis_ctx, self.image_encoder.width, vis_depth, self.image_encoder.num_layers,
            device=self.text_prompts.ctx.device,
        )

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.vision_prompts.layers()
        return self.image_encoder(
            images, prompts=visual[0], prompt_position="append",
            deep_prompts=layer_list(visual, self.image_encoder.num_layers),
        )
