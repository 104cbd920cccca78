"""Plain-PyTorch definitions of fastprompt's ops: the spec every Triton kernel is tested against.

They materialise the full score matrix and the logits, compute in float32 for half-precision
inputs (float64 stays float64), and are differentiable by autograd. The maths: docs/dpl.md (the
decoupled attention and its mixing rules) and docs/methods.md (DePT's CAT head and loss).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .validation import check_cat_head_args, check_decoupled_attention_args

__all__ = [
    "decoupled_attention",
    "visibility_mask",
    "mix_weight",
    "cat_head_loss",
    "cat_head_logits",
    "itm_logits",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def visibility_mask(
    n: int, *, prompt_start: int, num_prompts: int, causal: bool, prompt_rows_see_all: bool, device=None
) -> torch.Tensor:
    """[N, N] bool: may query row i attend to key column j.

    Causal masking hides later keys; with `prompt_rows_see_all` prompt rows are exempt from it
    (DPL's language-conditioned prompting: prompts read the whole text, class name included).
    """
    allowed = torch.ones(n, n, dtype=torch.bool, device=device)
    if causal:
        allowed = torch.tril(allowed)
        if prompt_rows_see_all and num_prompts > 0:
            allowed[prompt_start : prompt_start + num_prompts] = True
    return allowed


def _segment_attention(scores: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor):
    """Softmax attention restricted to the allowed keys of one segment, safe for empty rows.

    Returns (out [..., N, D], lse [..., N], has_key [..., N]); a row with no allowed key gets
    out = 0 and lse = -inf, never 0/0 (and no NaN gradient).
    """
    has_key = allowed.any(dim=-1).expand(scores.shape[:-1])
    masked = scores.masked_fill(~allowed, float("-inf"))
    # The row max is detached: it cancels in the value and so in the gradient.
    row_max = masked.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(masked - row_max)  # exp(-inf) = 0 on masked keys
    z = p.sum(dim=-1)
    z_safe = torch.where(has_key, z, torch.ones_like(z))
    out = (p @ v) / z_safe.unsqueeze(-1)
    lse = torch.where(has_key, torch.log(z_safe) + row_max.squeeze(-1), torch.full_like(z, float("-inf")))
    return out, lse, has_key


def mix_weight(
    mix: str,
    weight,
    lse_p: torch.Tensor,
    lse_x: torch.Tensor,
    has_p: torch.Tensor,
    has_x: torch.Tensor,
) -> torch.Tensor:
    """w, the prompts' share of each row ([B, H, N]), under one mixing rule (docs/dpl.md).

    A row that sees no prompt key gets w = 0, one that sees no instance key gets w = 1.
    """
    both = has_p & has_x
    if mix in ("exact", "detached"):
        diff = torch.where(both, lse_p - lse_x, torch.zeros_like(lse_p))
        w = torch.sigmoid(diff)
        if mix == "detached":
            w = w.detach()
    elif mix == "fixed":
        w = torch.full_like(lse_p, float(weight))
    elif mix == "learned":
        theta = weight.to(lse_p.dtype)
        w = torch.sigmoid(theta).view(1, -1, 1).expand_as(lse_p)
    else:  # validated at the boundary
        raise ValueError(f"unknown mixing rule {mix!r}")
    return torch.where(both, w, has_p.to(lse_p.dtype))


def decoupled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    prompt_start: int,
    num_prompts: int,
    causal: bool = False,
    prompt_rows_see_all: bool = False,
    instance_mix: str = "exact",
    prompt_mix: str = "exact",
    instance_weight: Union[None, float, torch.Tensor] = None,
    prompt_weight: Union[None, float, torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """DPL's four-way decoupled attention (reference).

    q, k, v: [B, H, N, D]. Tokens [prompt_start, prompt_start + num_prompts) are prompts P, the
    rest instances X. Each row attends to P and to X separately (O_P, O_X, LSE_P, LSE_X) and mixes
    out = (1 - w) O_X + w O_P with w from the row type's rule: `instance_mix` for X rows,
    `prompt_mix` for P rows; `exact` reproduces standard attention.
    `fixed` takes a float c in [0, 1]; `learned` a tensor theta [H] (w = sigmoid(theta)).

    Returns out [B, H, N, D] in q's dtype, and with `return_lse=True` also (LSE_P, LSE_X), each
    [B, H, N] in float32 (float64 for float64 inputs); -inf where a row sees no key of a segment.
    """
    check_decoupled_attention_args(
        q, k, v, prompt_start=prompt_start, num_prompts=num_prompts, instance_mix=instance_mix,
        prompt_mix=prompt_mix, instance_weight=instance_weight, prompt_weight=prompt_weight, scale=scale,
    )
    n, d = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    ct = _compute_dtype(q.dtype)
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    scores = (qc @ kc.transpose(-1, -2)) * scale  # [B, H, N, N]

    allowed = visibility_mask(
        n, prompt_start=prompt_start, num_prompts=num_prompts, causal=causal,
        prompt_rows_see_all=prompt_rows_see_all, device=q.device,
    )
    is_prompt = torch.zeros(n, dtype=torch.bool, device=q.device)
    is_prompt[prompt_start : prompt_start + num_prompts] = True

    out_p, lse_p, has_p = _segment_attention(scores, vc, allowed & is_prompt.unsqueeze(0))
    out_x, lse_x, has_x = _segment_attention(scores, vc, allowed & ~is_prompt.unsqueeze(0))

    w_inst = mix_weight(instance_mix, instance_weight, lse_p, lse_x, has_p, has_x)
    w_prompt = mix_weight(prompt_mix, prompt_weight, lse_p, lse_x, has_p, has_x)
    w = torch.where(is_prompt.view(1, 1, n), w_prompt, w_inst).unsqueeze(-1)
    out = ((1 - w) * out_x + w * out_p).to(q.dtype)
    if return_lse:
        return out, lse_p, lse_x
    return out


def _as_scale(logit_scale, like: torch.Tensor):
    if isinstance(logit_scale, torch.Tensor):
        return logit_scale.detach().reshape(()).to(device=like.device, dtype=like.dtype)
    return float(logit_scale)  # a Python scalar: no host-to-device copy (and no sync) per call


def itm_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale) -> torch.Tensor:
    """CLIP's image-text matching logits s * cos(f_I, f_T): [B, C] from [B, d] and [C, d] or [B, C, d]."""
    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    s = _as_scale(logit_scale, img)
    if txt.ndim == 3:
        return s * torch.einsum("bd,bcd->bc", img, txt)
    return s * img @ txt.t()


def cat_head_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    *,
    gamma_img: torch.Tensor,
    beta_img: torch.Tensor,
    gamma_txt: torch.Tensor,
    beta_txt: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    logit_scale,
    lam: float = 0.7,
) -> torch.Tensor:
    """DePT's training loss (reference): (1 - lam) CE(z_ITM, y) + lam CE(z_CAT, [y; y]).

    image_features [B, d], text_features [C, d] or [B, C, d] (both raw), labels [B] int64,
    gamma/beta [d], weight [C, d], bias [C], logit_scale = s (the multiplier, ~100).
    The CAT batch is the true class's transformed text feature and the transformed image feature
    of every sample (2B rows). Returns a scalar (float32, or float64 for float64 inputs).
    """
    check_cat_head_args(
        image_features, text_features, labels, gamma_img=gamma_img, beta_img=beta_img,
        gamma_txt=gamma_txt, beta_txt=beta_txt, weight=weight, bias=bias, logit_scale=logit_scale, lam=lam,
    )
    ct = _compute_dtype(image_features.dtype)
    f_i, f_t = image_features.to(ct), text_features.to(ct)
    labels = labels.long()
    z_itm = itm_logits(f_i, f_t, logit_scale)
    if f_t.ndim == 3:
        f_t_true = f_t[torch.arange(f_t.shape[0], device=f_t.device), labels]
    else:
        f_t_true = f_t[labels]
    g = torch.cat([gamma_txt.to(ct) * f_t_true + beta_txt.to(ct), gamma_img.to(ct) * f_i + beta_img.to(ct)])
    z_cat = F.linear(g, weight.to(ct), bias.to(ct))
    lam = float(lam)
    return (1 - lam) * F.cross_entropy(z_itm, labels) + lam * F.cross_entropy(z_cat, torch.cat([labels, labels]))


def cat_head_logits(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    gamma_img: torch.Tensor,
    beta_img: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    logit_scale,
    lam: float = 0.7,
    fuse: bool = True,
) -> torch.Tensor:
    """DePT's base-class inference logits [B, C] (reference).

    fuse=True: (1 - lam) z_ITM + lam z_CAT(gamma_img f_I + beta_img); fuse=False: z_CAT alone.
    """
    check_cat_head_args(
        image_features, text_features, gamma_img=gamma_img, beta_img=beta_img, weight=weight,
        bias=bias, logit_scale=logit_scale, lam=lam,
    )
    ct = _compute_dtype(image_features.dtype)
    f_i = image_features.to(ct)
    z_cat = F.linear(gamma_img.to(ct) * f_i + beta_img.to(ct), weight.to(ct), bias.to(ct))
    if not fuse:
        return z_cat
    lam = float(lam)
    return (1 - lam) * itm_logits(f_i, text_features.to(ct), logit_scale) + lam * z_cat
