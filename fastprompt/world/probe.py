"""Zero-shot probe of a world CLIP: "a photo of a <colour> <shape>." over all 64 pairs.

Reports accuracy on the pairs pretraining showed (64-way), on the 16 held-out pairs (64-way, and
16-way among the held-out names), and how often colour or shape alone is right. The probe images
are drawn from their own fixed seed, apart from any training or dataset images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .captions import FULL_TEMPLATES
from .domains import CLEAN, Domain
from .render import render, to_uint8
from .scenes import HELD_OUT_PAIR_INDICES, attributes_for_pairs
from .vocabulary import NUM_PAIRS, NUM_SHAPES, class_name, pair_of

PROBE_SEED = 20_240_917
ZERO_SHOT_TEMPLATE = FULL_TEMPLATES[0]  # "a photo of a {colour} {shape}." = the generic "a photo of a {}."


def probe_images(per_pair: int, domain: Domain = CLEAN, seed: int = PROBE_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [64 * per_pair, 3, 32, 32], canonical pair labels [64 * per_pair])."""
    g = torch.Generator().manual_seed(seed)
    pairs = torch.arange(NUM_PAIRS).repeat_interleave(per_pair)
    a = attributes_for_pairs(pairs, g)
    return to_uint8(render(a[:, 0], a[:, 1], a[:, 2], a[:, 3], generator=g, domain=domain)), pairs


@torch.no_grad()
def class_text_features(model: nn.Module, tokenizer, names: list[str], template: str = "a photo of a {}.") -> torch.Tensor:
    tokens = tokenizer([template.format(n) for n in names])
    return F.normalize(model.encode_text(tokens.to(next(model.parameters()).device)).float(), dim=-1)


@torch.no_grad()
def image_features(model: nn.Module, images: torch.Tensor, mean, std, batch_size: int = 512) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> L2-normalised features [N, d] (CLIP normalisation as `mean`, `std`)."""
    device = next(model.parameters()).device
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = (images[i:i + batch_size].to(device).float() / 255.0 - mean_t) / std_t
        out.append(F.normalize(model.encode_image(x).float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def zero_shot_probe(model: nn.Module, tokenizer, mean, std, *, per_pair: int = 20, domain: Domain = CLEAN) -> dict:
    """Accuracies in percent: seen (64-way), held_out (64-way), held_out_16 (16-way among held-out
    names), colour and shape (the predicted 64-way name's colour/shape is right, all images)."""
    was_training = model.training
    model.eval()
    images, pairs = probe_images(per_pair, domain)
    feats = image_features(model, images, mean, std)
    text = class_text_features(model, tokenizer, [class_name(*pair_of(i)) for i in range(NUM_PAIRS)])
    pred = (feats @ text.T).argmax(-1)
    held = torch.isin(pairs, HELD_OUT_PAIR_INDICES)
    held_pred = HELD_OUT_PAIR_INDICES[(feats[held] @ text[HELD_OUT_PAIR_INDICES].T).argmax(-1)]
    model.train(was_training)
    pct = lambda m: round(100.0 * float(m.float().mean()), 2)  # noqa: E731
    return {
        "seen": pct(pred[~held] == pairs[~held]),
        "held_out": pct(pred[held] == pairs[held]),
        "held_out_16": pct(held_pred == pairs[held]),
        "colour": pct(pred // NUM_SHAPES == pairs // NUM_SHAPES),
        "shape": pct(pred % NUM_SHAPES == pairs % NUM_SHAPES),
        "images": int(pairs.numel()),
    }
