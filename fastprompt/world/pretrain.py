"""The recipe that makes fastprompt's shipped `fastprompt-world` weights, from a seed.

Contrastive image-text pretraining of a small open_clip ViT on freshly rendered images (never the
same image twice): every step draws `batch_size` scenes of the 48 pretraining pairs (the 16
held-out pairs are never drawn), renders them, and captions each with one template (a third of
them partial: "a red shape.", "a star."; half of them led by filler words, see captions.py). The loss is CLIP's symmetric cross-entropy with every
caption that is true of an image counted as a positive (`captions.positives`): a partial caption
names fewer attributes and so is true of many images in a batch.

Only the ~40 token rows the captions use are trained (a compact table scattered back at the end),
which keeps AdamW from touching 6.3M untouched embedding values every step. Everything random
comes from generators seeded by `Recipe.seed`, so on one machine with the same torch and thread
count the same recipe gives the same weights, bit for bit.
"""
from __future__ import annotations

import hashlib
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ..encoders import TextEncoder
from .captions import CaptionTable, positives
from .probe import zero_shot_probe
from .render import render, to_uint8
from .scenes import sample_pretraining_attributes

MODEL_NAME = "fastprompt-world"


@dataclass(frozen=True)
class Recipe:
    """Everything the shipped weights depend on. `steps` x `batch_size` fresh images."""

    seed: int = 0
    steps: int = 2500
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only; biases, norms, embeddings and the temperature get none
    beta2: float = 0.98
    eps: float = 1e-6
    max_logit_scale: float = 100.0
    threads: int = 2  # CPU intra-op threads: the float reductions (so the last bits) depend on it


def _build_model(seed: int) -> nn.Module:
    """The random init `load_clip(MODEL_NAME, seed=seed)` gives (its own seeded RNG), trainable."""
    from ..clip import load_clip

    return load_clip(MODEL_NAME, None, seed=seed).model.requires_grad_(True)


def _param_groups(model: nn.Module, compact: nn.Parameter, weight_decay: float) -> list[dict]:
    decay, no_decay = [], [compact]
    for name, p in model.named_parameters():
        if name == "token_embedding.weight":
            continue  # trained through `compact`
        is_matrix = p.ndim >= 2 and "embedding" not in name
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * t))


def multi_positive_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, positive: torch.Tensor,
                             scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric loss with several positives: -log of the softmax mass on the true pairs.

    image_features [B, d], text_features [B, d] (unnormalised), positive bool [B, B] (image i,
    caption j) with a true diagonal; scale: the temperature multiplier (a scalar tensor).
    """
    logits = scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    on_true = logits.masked_fill(~positive, float("-inf"))
    per_image = logits.logsumexp(1) - on_true.logsumexp(1)
    per_caption = logits.logsumexp(0) - on_true.logsumexp(0)
    return 0.5 * (per_image.mean() + per_caption.mean())


def pretrain(recipe: Recipe = Recipe(), *, device: str = "cpu", say: Callable[[str], None] = print,
             log_every: int = 100) -> tuple[nn.Module, dict]:
    """Train the world CLIP; returns (model in eval mode on the CPU, a record of the run)."""
    start = time.perf_counter()
    load_before = os.getloadavg()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        model, vocab_size, final_loss = _train(recipe, torch.device(device), say, log_every, start)
    finally:
        torch.set_num_threads(threads_before)
    record = {
        "recipe": asdict(recipe),
        "model": MODEL_NAME,
        "device": device,
        "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpu": platform.processor() or platform.machine(),
        "train_seconds": round(time.perf_counter() - start, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "final_loss": round(final_loss, 4),
        "trained_token_rows": vocab_size,
    }
    return model, record


def _train(recipe: Recipe, dev: torch.device, say: Callable[[str], None], log_every: int,
           start: float) -> tuple[nn.Module, int, float]:
    model = _build_model(recipe.seed).to(dev).train()
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    mean = torch.tensor(preprocess["mean"], device=dev).view(1, 3, 1, 1)
    std = torch.tensor(preprocess["std"], device=dev).view(1, 3, 1, 1)

    captions = CaptionTable.build(tokenizer)
    vocab = captions.vocabulary()  # the token rows pretraining can ever read
    to_compact = torch.full((model.token_embedding.num_embeddings,), -1, dtype=torch.long)
    to_compact[vocab] = torch.arange(vocab.numel())
    compact = nn.Parameter(model.token_embedding.weight.detach()[vocab.to(dev)].clone())
    text_encoder = TextEncoder(model)

    optimizer = torch.optim.AdamW(_param_groups(model, compact, recipe.weight_decay), lr=recipe.lr,
                                  betas=(0.9, recipe.beta2), eps=recipe.eps)
    generator = torch.Generator().manual_seed(recipe.seed)  # images and captions; rendered on the CPU
    max_log_scale = math.log(recipe.max_logit_scale)
    window = max(log_every, 1)
    losses = []
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, recipe)
        attributes = sample_pretraining_attributes(recipe.batch_size, generator)
        pixels = render(attributes[:, 0], attributes[:, 1], attributes[:, 2], attributes[:, 3], generator=generator)
        images = (to_uint8(pixels).to(dev).float() / 255.0 - mean) / std  # as a PNG would store it
        tokens, constraints = captions.sample(attributes, generator)
        embedded = F.embedding(to_compact[tokens].to(dev), compact)
        text = text_encoder(embedded, text_encoder.pool_index(tokens).to(dev))
        loss = multi_positive_clip_loss(model.encode_image(images), text,
                                        positives(attributes, constraints).to(dev), model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_log_scale)
        losses.append(float(loss.detach()))
        if log_every and ((step + 1) % log_every == 0 or step + 1 == recipe.steps):
            recent = sum(losses[-window:]) / len(losses[-window:])
            say(f"step {step + 1:5d}/{recipe.steps}  loss {recent:.4f}  lr {_lr_at(step, recipe):.2e}  "
                f"scale {float(model.logit_scale.detach().exp()):.1f}  {time.perf_counter() - start:.0f} s")

    with torch.no_grad():  # the trained rows back into the full table; rows never read are zero
        table = torch.zeros_like(model.token_embedding.weight)
        table[vocab.to(dev)] = compact
        model.token_embedding.weight.copy_(table)
    final_loss = sum(losses[-window:]) / len(losses[-window:])
    return model.cpu().eval(), int(vocab.numel()), final_loss


def save_weights(model: nn.Module, path: str | Path, record: dict) -> dict:
    """Pack (fp16, sparse token table) and write the weights; the probe measures the packed copy."""
    from ..shipped_weights import pack_state_dict, save_packed, unpack_state_dict

    rows = (model.token_embedding.weight != 0).any(dim=1).nonzero().flatten()
    packed = pack_state_dict(model.state_dict(), rows)
    # Probe what ships (fp16-rounded), not the fp32 model that produced it.
    shipped = _build_model(record["recipe"]["seed"])
    shipped.load_state_dict(unpack_state_dict(packed, shipped.state_dict()))
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    preprocess = open_clip.get_model_preprocess_cfg(shipped)
    record = {**record, "weights_sha256": tensors_digest(packed),
              "zero_shot": zero_shot_probe(shipped, tokenizer, preprocess["mean"], preprocess["std"])}
    save_packed(path, packed, record)
    record["file_bytes"] = Path(path).stat().st_size
    return record


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: equal digests mean bit-identical weights (the
    file's own hash also covers the run's timings in its metadata)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
