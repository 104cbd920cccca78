"""Zero-shot CLIP: a hand-written template per class, nothing trains."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastprompt.clip import ClipBundle

from .base import PromptedCLIP, check_classnames
from .prompts import tokenize_class_prompts
from .templates import GENERIC_TEMPLATE


def encode_template(model: PromptedCLIP, template: str, classnames: Sequence[str]) -> torch.Tensor:
    """Frozen text features [C, d] of `template` filled with each class name."""
    if "{}" not in template:
        raise ValueError(f"template {template!r} must contain '{{}}' where the class name goes")
    device = model.text_encoder.token_embedding.weight.device
    prompts = [template.format(name) for name in classnames]
    ids = tokenize_class_prompts(model.tokenizer, prompts, classnames, model.text_encoder.context_length).to(device)
    with torch.no_grad():
        enc = model.text_encoder
        return enc(enc.embed(ids), enc.pool_index(ids)).float()


class ZeroShotCLIP(PromptedCLIP):
    method = "zsclip"
    DEFAULTS = {"template": GENERIC_TEMPLATE}

    def __init__(self, clip: ClipBundle, classnames: Sequence[str], *, template: str, attention_backend: str = "auto"):
        super().__init__(clip, attention_backend=attention_backend)
        self.template = template
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = check_classnames(classnames)
        self.register_buffer("class_text_features", encode_template(self, self.template, self.classnames), persistent=False)

    def text_features(self, image_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.class_text_features
