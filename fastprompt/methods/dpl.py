"""DPL: deep prompts whose attention is decoupled into prompt and instance sub-processes.

fastprompt's own reading of the DPL abstract (docs/dpl.md states the definition; the paper has no
public code). Every layer that holds prompt tokens runs decoupled attention: instance rows (image patches,
text tokens) mix their instance-only attention X->X with their read of the prompts X->P by the
`instance_mix` rule, prompt rows by `prompt_mix`. The default keeps prompt rows `exact` and fixes
the instances' share of prompts to c = 0.1, so X->X keeps frozen CLIP's own attention pattern (90%
of each instance row) and the prompts enter through a fixed, non-competing channel: the
"approximation" meant to preserve generalisation to unseen classes. On the text side, prompt rows
are exempt from the causal mask (language-conditioned prompting): the prompts read the whole text,
the class name included, while instance rows keep CLIP's causal attention.

Modalities: "text" (deep textual prompts), "vision" (VPT-deep visual prompts; text from a
hand-written template), "multimodal" (MaPLe-style coupling: visual prompts projected from the
textual prompts of the same layer).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import nn

from fastprompt.clip import ClipBundle
from fastprompt.encoders import PromptAttention
from fastprompt.kernels.validation import MIX_RULES

from .base import PromptedCLIP, check_classnames
from .prompts import CoupledVisionPrompts, TextPrompts, VisionPrompts, layer_list
from .templates import GENERIC_TEMPLATE
from .zsclip import encode_template

MODALITIES = ("text", "vision", "multimodal")


def _check_share(name: str, mix: str, c) -> None:
    if mix in ("fixed", "learned"):
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            raise ValueError(f"{name} must be a float share in (0, 1) for the {mix!r} rule, got {c!r}")
        lo_ok = c > 0 if mix == "learned" else c >= 0
        hi_ok = c < 1 if mix == "learned" else c <= 1
        if not (lo_ok and hi_ok):
            bounds = "(0, 1)" if mix == "learned" else "[0, 1]"
            raise ValueError(f"{name}={c} must lie in {bounds} for the {mix!r} rule")


class _MixWeights(nn.Module):
    """One row type's mixing weight per layer: a float c (`fixed`), a trainable logit per head
    initialised at logit(c) (`learned`), or nothing (`exact`, `detached`)."""

    def __init__(self, mix: str, share: float, num_layers: int, heads: int, device=None):
        super().__init__()
        self.mix, self.share = mix, float(share)
        self.theta = nn.ParameterList()
        if mix == "learned":
            logit = math.log(self.share / (1.0 - self.share))
            self.theta.extend(nn.Parameter(torch.full((heads,), logit, device=device)) for _ in range(num_layers))

    def layer(self, i: int):
        if self.mix == "fixed":
            return self.share
        if self.mix == "learned":
            return self.theta[i]
        return None


class DPL(PromptedCLIP):
    method = "dpl"
    DEFAULTS = {
        "modality": "multimodal",
        "n_ctx": 2,
        "ctx_init": "a photo of a",
        "ctx_std": 0.02,
        "depth": 9,
        "n_vis_ctx": 4,
        "vis_prompt_position": "after_cls",
        "template": GENERIC_TEMPLATE,
        "instance_mix": "fixed",
        "instance_weight": 0.1,
        "prompt_mix": "exact",
        "prompt_weight": 0.5,
        "language_conditioned": True,
    }

    # Options each modality leaves unused: setting one is a mistake worth saying (see factory).
    # (`template` is not listed: `fastprompt train` passes each dataset's to every method that has one.)
    UNUSED_OPTIONS = {
        "text": ("n_vis_ctx", "vis_prompt_position"),
        "vision": ("n_ctx", "ctx_init", "ctx_std", "language_conditioned"),
        "multimodal": ("n_vis_ctx", "vis_prompt_position"),
    }

    def __init__(
        self,
        clip: ClipBundle,
        classnames: Sequence[str],
        *,
        modality: str,
        n_ctx: Optional[int],
        ctx_init: Optional[str],
        ctx_std: float,
        depth: int,
        n_vis_ctx: int,
        vis_prompt_position: str,
        template: str,
        instance_mix: str,
        instance_weight: float,
        prompt_mix: str,
        prompt_weight: float,
        language_conditioned: bool,
        attention_backend: str = "auto",
    ):
        super().__init__(clip, attention_backend=attention_backend)
        if modality not in MODALITIES:
            raise ValueError(f"modality={modality!r} must be one of {', '.join(MODALITIES)}")
        for arg, mix in (("instance_mix", instance_mix), ("prompt_mix", prompt_mix)):
            if mix not in MIX_RULES:
                raise ValueError(f"{arg}={mix!r} is not a mixing rule; choose one of {', '.join(MIX_RULES)}")
        _check_share("instance_weight", instance_mix, instance_weight)
        _check_share("prompt_weight", prompt_mix, prompt_weight)
        self.modality = modality
        self.image_prompted = modality != "text"
        self.template = template
        self.language_conditioned = bool(language_conditioned)
        self.instance_mix, self.prompt_mix = instance_mix, prompt_mix
        self.classnames = check_classnames(classnames)
        device = self.text_encoder.token_embedding.weight.device
        text_enc, image_enc = self.text_encoder, self.image_encoder

        self.text_prompts: Optional[TextPrompts] = None
        self.vision_prompts: Optional[nn.Module] = None
        if modality in ("text", "multimodal"):
            self.text_prompts = TextPrompts(
                text_enc, self.tokenizer, self.classnames, n_ctx=n_ctx, ctx_init=ctx_init, ctx_std=ctx_std, depth=depth
            )
        else:
            self._encode_template()
        if modality == "multimodal":
            self.vision_prompts = CoupledVisionPrompts(self.text_prompts, text_enc.width, image_enc.width, image_enc.num_layers)
            self.vis_prompt_position = "append"  # MaPLe's placement
        elif modality == "vision":
            self.vision_prompts = VisionPrompts(n_vis_ctx, image_enc.width, depth, image_enc.num_layers, device=device)
            image_enc.prompt_start(vis_prompt_position)  # validates the position
            self.vis_prompt_position = vis_prompt_position

        # Mixing weights per side that holds prompts, per layer (every layer holds the prompt tokens).
        def weights(num_layers: int, heads: int) -> nn.ModuleDict:
            return nn.ModuleDict({
                "instance": _MixWeights(instance_mix, instance_weight, num_layers, heads, device),
                "prompt": _MixWeights(prompt_mix, prompt_weight, num_layers, heads, device),
            })

        self.text_mix = weights(text_enc.num_layers, text_enc.heads) if self.text_prompts is not None else None
        self.vision_mix = weights(image_enc.num_layers, image_enc.heads) if self.vision_prompts is not None else None

    def _encode_template(self) -> None:
        self.register_buffer("template_features", encode_template(self, self.template, self.classnames), persistent=False)

    def _attention(self, mix: nn.ModuleDict, num_layers: int, see_all: bool) -> List[PromptAttention]:
        return [
            PromptAttention(
                instance_mix=self.instance_mix, prompt_mix=self.prompt_mix,
                instance_weight=mix["instance"].layer(i), prompt_weight=mix["prompt"].layer(i),
                prompt_rows_see_all=see_all,
            )
            for i in range(num_layers)
        ]

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = check_classnames(classnames)
        if self.text_prompts is not None:
            self.text_prompts.set_classnames(self.text_encoder, self.tokenizer, self.classnames)
        else:
            self._encode_template()

    def text_features(self, image_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.text_prompts is None:
            return self.template_features
        attention = self._attention(self.text_mix, self.text_encoder.num_layers, self.language_conditioned)
        return self.text_prompts.encode(self.text_encoder, attention=attention)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if self.vision_prompts is None:
            return self.image_encoder(images)
        if isinstance(self.vision_prompts, CoupledVisionPrompts):
            visual = self.vision_prompts.layers(self.text_prompts)
        else:
            visual = self.vision_prompts.layers()
        enc = self.image_encoder
        return enc(
            images, prompts=visual[0], prompt_position=self.vis_prompt_position,
            deep_prompts=layer_list(visual, enc.num_layers),
            attention=self._attention(self.vision_mix, enc.num_layers, see_all=False),
        )
