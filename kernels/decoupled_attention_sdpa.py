"""DPL's decoupled attention from fused SDPA calls: the fast path where Triton cannot run.

The decomposition needs, per query row, the attention output over the prompt keys P and over the
instance keys X; each row type then mixes them. No call here materialises a score matrix over the
instance keys: every segment is one `F.scaled_dot_product_attention` call (a fused kernel on CPU
and on every GPU), on row groups and key segments arranged so that each call needs no mask or a
plain causal one:

  rows \\ keys        instance keys X                     prompt keys P
  instance rows      X rows over X keys, causal if the   rows after the prompt range: all of P;
                     tower is (order kept, so the        rows before it see none (w = 0)
                     compacted sequence is plain causal)
  prompt rows        all of X (non-causal, or            all of P (non-causal or exempt),
                     `prompt_rows_see_all`), else the    else causal among the prompts
                     instance keys before the prompts

`fixed` and `learned` rules mix the two outputs with w = c or sigmoid(theta); gradients flow through
the SDPA outputs (and theta) only, so autograd's own SDPA backward is exact. An `exact` row group is
standard attention over the keys it may see: one SDPA call over all of them (a small explicit mask
only for causal prompt rows, which are few). `detached` needs the log-sum-exp of both segments as
values without gradient: computed in bounded chunks under no_grad.

Same arguments and results as `reference.decoupled_attention` (return_lse excepted), to rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .validation import check_decoupled_attention_args

__all__ = ["decoupled_attention_sdpa"]

# Scores per chunk when `detached` rows need their log-sum-exp (no gradient): 16M floats = 64 MB.
_LSE_CHUNK_ELEMENTS = 1 << 24


def _sdpa(q, k, v, scale, *, causal=False, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _lse(q: torch.Tensor, k: torch.Tensor, scale: float, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """log sum_j exp(q k_j * scale) over the allowed keys, [B, H, R] in float32 (float64 stays),
    without gradient and without holding more than _LSE_CHUNK_ELEMENTS scores at once."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h, rows, _ = q.shape
    per_row = max(1, b * h * k.shape[2])
    step = max(1, _LSE_CHUNK_ELEMENTS // per_row)
    out = []
    with torch.no_grad():
        for start in range(0, rows, step):
            s = (q[:, :, start : start + step].to(ct) @ k.to(ct).transpose(-1, -2)) * scale
            if mask is not None:
                s = s.masked_fill(~mask[start : start + step], float("-inf"))
            out.append(torch.logsumexp(s, dim=-1))
    return torch.cat(out, dim=2)


def _mix(o_x, o_p, mix: str, weight, lse_pair, rows_seeing: Optional[torch.Tensor], compute_dtype):
    """(1 - w) O_X + w O_P for one row group. `rows_seeing` [R, 1] (or None: all) is 1 for the rows
    that see both segments and 0 for those that see no prompt (w = 0: their O_P is never used)."""
    if mix == "fixed":
        w = torch.full((1, 1, 1, 1), float(weight), dtype=compute_dtype, device=o_x.device)
    elif mix == "learned":
        w = torch.sigmoid(weight.to(compute_dtype)).view(1, -1, 1, 1)
    else:  # detached
        lse_p, lse_x = lse_pair()
        w = torch.sigmoid(lse_p - lse_x).unsqueeze(-1)
    if rows_seeing is not None:
        w = w * rows_seeing
    return torch.lerp(o_x.to(compute_dtype), o_p.to(compute_dtype), w.to(compute_dtype))


def _join(*parts: torch.Tensor) -> torch.Tensor:
    """The non-empty parts along the token axis (a view when only one is non-empty)."""
    parts = [p for p in parts if p.shape[2]]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


@dataclass(frozen=True)
class _Layout:
    prompt_start: int
    num_prompts: int
    causal: bool
    see_all: bool  # prompt rows see every key (not causal, or exempt from the causal mask)
    instance_mix: str
    prompt_mix: str
    scale: float


def _decomposed(qs, ks, vs, instance_weight, prompt_weight, lay: _Layout):
    """The output rows of the three token groups (instances before the prompts, prompts, instances
    after), from the three segments of q, k and v."""
    (q_a, q_p, q_c), (k_a, k_p, k_c), (v_a, v_p, v_c) = qs, ks, vs
    ps, num_prompts, scale = lay.prompt_start, lay.num_prompts, lay.scale
    ct = torch.float64 if q_p.dtype == torch.float64 else torch.float32
    q_x, k_x, v_x = _join(q_a, q_c), _join(k_a, k_c), _join(v_a, v_c)

    # Instance rows.
    if lay.instance_mix == "exact":
        # Standard attention over the keys each instance row sees: the full sequence's causal rows
        # (the prompts before a row are visible to it), or all keys.
        if lay.causal:
            o_all = _sdpa(_join(q_a, q_p, q_c), _join(k_a, k_p, k_c), _join(v_a, v_p, v_c), scale, causal=True)
            before, _, after = o_all.split([ps, num_prompts, q_c.shape[2]], dim=2)
            o_inst = _join(before, after)
        else:
            o_inst = _sdpa(q_x, _join(k_a, k_p, k_c), _join(v_a, v_p, v_c), scale)
    else:
        o_xx = _sdpa(q_x, k_x, v_x, scale, causal=lay.causal)
        # Causal: the rows before the prompts see none of them (w = 0); the rows after see them all.
        rows_seeing = None
        if lay.causal and ps > 0:
            rows_seeing = (torch.arange(q_x.shape[2], device=q_x.device) >= ps).to(ct).unsqueeze(-1)

        def lse_pair():
            mask_x = _causal_rows(q_x.shape[2], 0, q_x.device) if lay.causal else None
            return _lse(q_x, k_p, scale, None), _lse(q_x, k_x, scale, mask_x)

        o_inst = _mix(o_xx, _sdpa(q_x, k_p, v_p, scale), lay.instance_mix, instance_weight, lse_pair, rows_seeing, ct)

    # Prompt rows: all keys, or (causal, not exempt) the instance keys before the prompts and the
    # prompts up to the row itself.
    if lay.prompt_mix == "exact":
        if lay.see_all:
            o_prompt = _sdpa(q_p, _join(k_a, k_p, k_c), _join(v_a, v_p, v_c), scale)
        else:  # rows ps..pe-1 over keys 0..pe-1, causal aligned at the bottom right
            mask = torch.ones(num_prompts, ps + num_prompts, dtype=torch.bool, device=q_p.device).tril(ps)
            o_prompt = _sdpa(q_p, _join(k_a, k_p), _join(v_a, v_p), scale, mask=mask)
    else:
        o_prompt = _sdpa(q_p, k_p, v_p, scale, causal=not lay.see_all)
        k_px, v_px = (k_x, v_x) if lay.see_all else (k_a, v_a)
        if k_px.shape[2] > 0:  # else (prompts first in a causal tower) no instance key is visible: w = 1

            def lse_pair():
                mask_p = None if lay.see_all else _causal_rows(num_prompts, 0, q_p.device)
                return _lse(q_p, k_p, scale, mask_p), _lse(q_p, k_px, scale, None)

            o_prompt = _mix(_sdpa(q_p, k_px, v_px, scale), o_prompt, lay.prompt_mix, prompt_weight, lse_pair, None, ct)
    dtype = q_p.dtype
    # split, not slicing: its backward concatenates instead of zero-filling a gradient per slice.
    before, after = o_inst.to(dtype).split([ps, o_inst.shape[2] - ps], dim=2)
    return before, o_prompt.to(dtype), after


def _segments(t: torch.Tensor, lay: _Layout):
    pe = lay.prompt_start + lay.num_prompts
    return t[:, :, : lay.prompt_start], t[:, :, lay.prompt_start : pe], t[:, :, pe:]


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


class _SegmentedAttention(torch.autograd.Function):
    """Autograd over the segments: each segment of q, k, v is a leaf of an inner graph, so the
    backward writes each input gradient once (one concatenation) instead of zero-filling a full
    gradient per slice and adding them up. The first backward consumes the inner graph (its
    buffers are freed as autograd goes, as usual); a second one through a retained outer graph
    (`backward(retain_graph=True)` twice) rebuilds it from the saved inputs."""

    @staticmethod
    def _inner_graph(q, k, v, instance_weight, prompt_weight, lay: _Layout):
        def leaf(t):
            return t.detach().requires_grad_(t.requires_grad)

        qs, ks, vs = ([leaf(s) for s in _segments(t, lay)] for t in (q, k, v))
        weights = [leaf(w) if isinstance(w, torch.Tensor) else w for w in (instance_weight, prompt_weight)]
        # The inner graph keeps its own saved tensors: an enclosing torch.utils.checkpoint's hooks
        # would otherwise recompute the whole checkpointed region each time it reads one of them.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            out = _join(*_decomposed(qs, ks, vs, *weights, lay))
        return out, qs + ks + vs, weights

    @staticmethod
    def forward(ctx, q, k, v, instance_weight, prompt_weight, lay: _Layout):
        ctx.inner = _SegmentedAttention._inner_graph(q, k, v, instance_weight, prompt_weight, lay)
        # Views of the inputs (no copy): only read again if a retained graph is differentiated twice.
        ctx.inputs = (q, k, v, instance_weight, prompt_weight, lay)
        return ctx.inner[0].detach()

    @staticmethod
    def backward(ctx, grad_out):
        inner = getattr(ctx, "inner", None) or _SegmentedAttention._inner_graph(*ctx.inputs)
        ctx.inner = None
        out, leaves, weights = inner
        wanted = [t for t in leaves + weights if isinstance(t, torch.Tensor) and t.requires_grad]
        found = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))
        grads = {id(t): next(found) for t in wanted}

        def grad_of(t):
            g = grads.get(id(t)) if isinstance(t, torch.Tensor) else None
            return torch.zeros_like(t) if g is None and isinstance(t, torch.Tensor) and t.requires_grad else g

        def whole(segment_leaves):
            if not any(t.requires_grad for t in segment_leaves):
                return None
            return _join(*[grad_of(t) if t.requires_grad else torch.zeros_like(t) for t in segment_leaves])

        dq, dk, dv = whole(leaves[0:3]), whole(leaves[3:6]), whole(leaves[6:9])
        return dq, dk, dv, grad_of(weights[0]), grad_of(weights[1]), None


def decoupled_attention_sdpa(
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
) -> torch.Tensor:
    """DPL's decoupled attention on [B, H, N, D] through fused SDPA calls (see the module docstring).

    Arguments as `fastprompt.kernels.reference.decoupled_attention`; returns out [B, H, N, D] in q's dtype.
    """
    check_decoupled_attention_args(
        q, k, v, prompt_start=prompt_start, num_prompts=num_prompts, instance_mix=instance_mix,
        prompt_mix=prompt_mix, instance_weight=instance_weight, prompt_weight=prompt_weight, scale=scale,
    )
    n, d = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    see_all = prompt_rows_see_all or not causal
    if num_prompts == 0 or (instance_mix == prompt_mix == "exact" and see_all == (not causal)):
        return _sdpa(q, k, v, scale, causal=causal)  # the decomposition is the identity
    if num_prompts == n:  # no instance token: every row uses the prompts alone (w = 1)
        return _sdpa(q, k, v, scale, causal=not see_all)
    lay = _Layout(prompt_start, num_prompts, causal, see_all, instance_mix, prompt_mix, scale)
    tensors = [t for t in (q, k, v, instance_weight, prompt_weight) if isinstance(t, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _SegmentedAttention.apply(q, k, v, instance_weight, prompt_weight, lay)
    return _join(*_decomposed(*(_segments(t, lay) for t in (q, k, v)), instance_weight, prompt_weight, lay))


def _causal_rows(n: int, first_row: int, device) -> torch.Tensor:
    """[n - first_row, n] bool: rows first_row.. of a causal mask over n tokens."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()[first_row:]
