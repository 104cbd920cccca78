"""PromptSRC (self-regulating prompts): IVLP's prompts trained with three terms that keep the
prompted model close to the frozen CLIP, and Gaussian prompt aggregation (GPA) over epochs.

With s = CLIP's logit scale, prompted raw features f [B, d] (image) and g [C, d] (text), the
frozen image encoder's features f0 of the same images, and g0 = the frozen text encoder's class
features averaged over `PROMPTSRC_TEMPLATES` (raw features averaged, then L2-normalised):

    z  = s norm(f) norm(g)^T,   z0 = s norm(f0) g0^T,   p = softmax(z), p0 = softmax(z0)
    L  = CE(z, y) + KL + text_loss_weight * mean|norm(g) - g0| + image_loss_weight * mean|norm(f) - norm(f0)|
    KL = sum_{b,c} p0 (log p0 - log p) / (B C)        (KL(zero-shot || prompted), temperature 1)

The frozen branch only serves training: inference uses the prompted features alone. g0 is
computed once per class list, the first time a loss needs it (never at evaluation, where it is
not used); f0 comes from the caller (`forward(..., frozen_image_features=...)`, e.g. encoded for
many steps in one no-grad batch) or from a no-grad pass of the unprompted image encoder.
GPA itself is driven by the training loop (fastprompt.methods.gpa); the model only carries its settings.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from fastprompt.clip import ClipBundle
from .gpa import check_gpa_settings
from fastprompt.kernels.reference import itm_logits

from .ivlp import IVLP
from .templates import PROMPTSRC_TEMPLATES
from .zsclip import encode_template


def _check_weight(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a float >= 0, got {value!r}")
    return float(value)


class PromptSRC(IVLP):
    method = "promptsrc"
    needs_frozen_image_features = True
    DEFAULTS = {
        **IVLP.DEFAULTS,
        "text_loss_weight": 25.0,
        "image_loss_weight": 10.0,
        "gpa": True,
        "gpa_mean": 15.0,  # base-to-new (20 epochs); few-shot and cross-dataset configs set theirs
        "gpa_std": 1.0,
    }

    def __init__(
        self,
        clip: ClipBundle,
        classnames: Sequence[str],
        *,
        text_loss_weight: float,
        image_loss_weight: float,
        gpa: bool,
        gpa_mean: float,
        gpa_std: float,
        **options,
    ):
        text_loss_weight = _check_weight("text_loss_weight", text_loss_weight)
        image_loss_weight = _check_weight("image_loss_weight", image_loss_weight)
        settings = check_gpa_settings(gpa_mean, gpa_std)  # before anything is built
        super().__init__(clip, classnames, **options)
        self.text_loss_weight, self.image_loss_weight = text_loss_weight, image_loss_weight
        self.gpa_settings = settings if gpa else None
        self._frozen_text: Dict[tuple, torch.Tensor] = {}  # class list -> g0 (a plain attribute: never saved)

    # --- the frozen branch --------------------------------------------------------------------
    def frozen_text_features(self) -> torch.Tensor:
        """g0 [C, d] (float32, L2-normalised) of the current classes; encoded once per class list."""
        key = tuple(self.classnames)
        device = self.text_encoder.token_embedding.weight.device
        g0 = self._frozen_text.get(key)
        if g0 is None:
            # Whatever the caller's context (a training step under autocast, an evaluation under
            # inference mode): encode in the backbone's own dtype, as ordinary tensors, no grad.
            with torch.inference_mode(False), torch.no_grad(), torch.autocast(device.type, enabled=False):
                total = None
                for template in PROMPTSRC_TEMPLATES:
                    features = encode_template(self, template, self.classnames)  # raw [C, d], float32
                    total = features if total is None else total + features
                g0 = F.normalize(total / len(PROMPTSRC_TEMPLATES), dim=-1)
        self._frozen_text[key] = g0 = g0.to(device)
        return g0

    def self_regulating_terms(
        self, text_features: torch.Tensor, image_features: torch.Tensor, frozen_image_features: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        """The three unweighted terms (float32 scalars) from raw g [C, d], f [B, d], f0 [B, d]:
        `kl` (KL(zero-shot || prompted) / (B C)), `text_l1` (mean |norm(g) - g0|),
        `image_l1` (mean |norm(f) - norm(f0)|)."""
        if text_features.ndim != 2:
            raise ValueError(f"text_features must be [C, d] class features, got {tuple(text_features.shape)}")
        g0 = self.frozen_text_features()
        # Small [B, C] and [B, d] tensors: float32 even under autocast (bf16 logits of scale 100
        # keep about 0.1 of absolute precision, too coarse for a KL between two close predictions).
        with torch.autocast(g0.device.type, enabled=False):
            f0 = F.normalize(frozen_image_features.detach().float(), dim=-1)
            logits = itm_logits(image_features.float(), text_features.float(), self.logit_scale)
            zero_shot_logits = itm_logits(f0, g0, self.logit_scale)
            kl = F.kl_div(
                F.log_softmax(logits, dim=-1), F.log_softmax(zero_shot_logits, dim=-1), reduction="sum", log_target=True
            ) / logits.numel()
            text_l1 = F.l1_loss(F.normalize(text_features.float(), dim=-1), g0)
            image_l1 = F.l1_loss(F.normalize(image_features.float(), dim=-1), f0)
        return {"kl": kl, "text_l1": text_l1, "image_l1": image_l1}

    def regularizer(
        self, text_features: torch.Tensor, *, image_features: Optional[torch.Tensor] = None,
        frozen_image_features: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if image_features is None or frozen_image_features is None:
            raise ValueError(
                "PromptSRC's loss needs the prompted and the frozen image features of the batch: call "
                "model(images, labels) (or pass frozen_image_features=model.encode_frozen_images(images))"
            )
        terms = self.self_regulating_terms(text_features, image_features, frozen_image_features)
        return terms["kl"] + self.text_loss_weight * terms["text_l1"] + self.image_loss_weight * terms["image_l1"]
