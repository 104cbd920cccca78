"""CoOp: n_ctx learnable context vectors shared by all classes, text side only:
"[SOS] ctx_1 .. ctx_n CLASSNAME . [EOS]"."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastprompt.clip import ClipBundle

from .base import PromptedCLIP, check_classnames
from .prompts import TextPrompts


class CoOp(PromptedCLIP):
    method = "coop"
    DEFAULTS = {"n_ctx": 16, "ctx_init": None, "ctx_std": 0.02}

    def __init__(
        self,
        clip: ClipBundle,
        classnames: Sequence[str],
        *,
        n_ctx: Optional[int],
        ctx_init: Optional[str],
        ctx_std: float,
        attention_backend: str = "auto",
        depth: int = 1,
    ):
        # depth > 1 (deep text prompts) is for subclasses (IVLP); CoOp's own options have no depth.
        super().__init__(clip, attention_backend=attention_backend)
        self.classnames = check_classnames(classnames)
        self.text_prompts = TextPrompts(
            self.text_encoder, self.tokenizer, self.classnames, n_ctx=n_ctx, ctx_init=ctx_init, ctx_std=ctx_std,
            depth=depth,
        )

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = check_classnames(classnames)
        self.text_prompts.set_classnames(self.text_encoder, self.tokenizer, self.classnames)

    def text_features(self, image_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.text_prompts.encode(self.text_encoder)
