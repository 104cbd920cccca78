"""Fused Triton kernels for DPL's four-way decoupled attention (forward and backward).

Same semantics as `fastprompt.kernels.reference.decoupled_attention` (the spec): tokens
[prompt_start, prompt_start + num_prompts) are prompts P, the rest instances X; every row keeps two
softmax states (over P keys and over X keys) and mixes out = (1 - w) O_X + w O_P with its row
type's rule. Two entry points share the kernels:
  decoupled_attention(q, k, v)            q, k, v [B, H, N, D], any strides;
  decoupled_attention_qkv(qkv, num_heads)  the packed projection [B, N, 3E] (batch-first) or
                                           [N, B, 3E] (sequence-first, OpenAI CLIP), out in the
                                           same layout [B, N, E] / [N, B, E], dqkv in qkv's layout.
Nothing is copied on the way in or out: the kernels read and write through strides.

Paths (`attention_path` says which one a call takes):
  sdpa    exact/exact rules with no mask or the plain causal mask (or no prompts and no learned
          rule): the decomposition is the identity, so F.scaled_dot_product_attention runs.
  single  exact/exact with prompt rows exempt from the causal mask: standard attention under a
          custom mask; ONE softmax state and one LSE, FlashAttention-2 loops.
  split   every other rule pair (DPL's default fixed/exact included) or `return_lse=True`: two
          softmax states, prompt and instance.

Forward (grid: batch*heads x query tiles). The instance sweep visits the key blocks in four runs:
blocks that hold no prompt column, no causal boundary and no padding take an unmasked step (the
FlashAttention inner loop); the others a masked step. A second, narrow sweep (BLOCK_P keys)
covers the prompt keys. Writes out, LSE_P/LSE_X (natural log, fp32), and for rules whose weight
carries no gradient through the LSEs (`fixed`, `learned`, `detached`) the output of the segment
with the smaller share, O_minor, in the input dtype: what the backward needs, so it never re-runs
the forward.

Backward (FlashAttention-2 style, probabilities recomputed from per-row statistics). Mixing gives
out_i = sum_j p_ij v_j with p_ij = w_i softmax_P(s_i)_j (j in P), (1 - w_i) softmax_X(s_i)_j
(j in X), i.e. p_ij = exp2(s_ij log2e - stat_i^seg), stat^P = LSE_P log2e - log2 w,
stat^X = LSE_X log2e - log2(1 - w). Then dS_ij = p_ij (dO_i . v_j - Delta_i^seg) with
Delta^seg = dO . O_seg for rules whose w carries no gradient, and Delta^P = Delta^X = dO . out
for `exact` (where the w term folds in: standard attention's backward). dO . O_major follows from
dO . out = (1 - w) dO . O_X + w dO . O_P dividing by the major share (>= 1/2). `learned`:
dL/dtheta_h = sum over that row type's rows of w (1 - w) dO . (O_P - O_X).
  dq kernel   (query tiles): computes the row statistics from out, dO, O_minor and the LSEs
              (stores them for dK/dV), then loops over the key blocks: 3 GEMMs and one exp2 per
              block, the same runs of unmasked and masked steps as the forward.
  dkdv kernel (key blocks): loops over query tiles, unmasked where the tile is past the causal
              diagonal and inside N; a key block that holds prompt columns selects each
              column's statistics (the only per-element select left).
No atomics: deterministic. dQ by recomputation in its own kernel is the cheapest exact scheme
that keeps determinism (FlashAttention-2's atomic dQ saves 2 GEMMs per block but adds a
fp32 atomic tile per block and a non-deterministic summation order).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .validation import check_decoupled_attention_args, check_triton_runnable, device_arch, triton_interpreter_enabled

__all__ = ["decoupled_attention", "decoupled_attention_qkv", "attention_path", "MIX_MODES", "INTERPRETED"]

# Triton decides at decoration time whether `@triton.jit` kernels run in its CPU interpreter.
INTERPRETED = triton_interpreter_enabled()

# Integer codes of the mixing rules inside the kernels.
MODE_EXACT, MODE_DETACHED, MODE_FIXED, MODE_LEARNED = 0, 1, 2, 3
MIX_MODES = {"exact": MODE_EXACT, "detached": MODE_DETACHED, "fixed": MODE_FIXED, "learned": MODE_LEARNED}

# Test hooks. POISON_OUTPUTS: every output buffer starts as NaN, so an element a kernel forgot to
# write fails the comparison. DISPATCH_TO_SDPA = False runs the fused kernels where the
# decomposition is the identity too (so tests reach the single-state kernels without a mask).
POISON_OUTPUTS = False
DISPATCH_TO_SDPA = True

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Launch configurations and autotuning
# ----------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, warps, stages) per kernel. Every config the pruning lets run on an
# architecture compiles there with no register spill at the CLIP shapes, for sm_90 and sm_80
# (tests/kernels/test_static_budget.py holds this; the table is benchmarks/results/static_budget.md).
# fp16/bf16 and fp32 have their own sets: fp32 inputs run 3xTF32 tensor-core dots (about fp32's
# accuracy), whose split operands need smaller tiles. Ampere's mma.sync keeps more of a tile in
# registers than Hopper's wgmma: the larger half-precision backward tiles are Hopper-only.
HALF_SHAPES = {
    "fwd": ((128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 64, 4, 3), (32, 32, 2, 3)),
    "dq": ((128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (32, 64, 4, 3)),
    "dkdv": ((64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3), (32, 32, 2, 3)),
}
HOPPER_ONLY = {"fwd": (), "dq": ((128, 64, 8, 2), (64, 64, 4, 2)), "dkdv": ((64, 128, 8, 2), (64, 64, 4, 2))}
FP32_SHAPES = {
    "fwd": ((32, 32, 4, 2), (32, 32, 2, 2), (16, 64, 4, 1)),
    "dq": ((16, 32, 4, 2), (16, 16, 2, 1)),
    "dkdv": ((16, 32, 4, 1), (32, 16, 4, 1), (64, 16, 4, 1)),
}


def _configs(kind: str):
    """Candidate configs for one kernel ('fwd', 'dq', 'dkdv'), both dtype families (pruned per call).

    Under the interpreter one config with 32-wide tiles: fast, and still several tiles at N=77
    so that every run of unmasked and masked blocks is exercised.
    """
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    shapes = dict.fromkeys(HALF_SHAPES[kind] + FP32_SHAPES[kind])  # ordered, no duplicates
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


def n_bucket(n: int) -> int:
    """The sequence length the autotuner keys on: N rounded up to a multiple of 64.

    Text truncation gives a new N for almost every class list; keying on the exact N would re-run
    the autotuning (compiles + benchmarks) for each. Every N in 8..77 maps to 64 or 128.
    """
    return max(64, triton.cdiv(n, 64) * 64)


def config_shapes(kind: str, dtype: torch.dtype, arch: int):
    """The (BLOCK_M, BLOCK_N, warps, stages) a kernel may run for a dtype on an architecture."""
    if dtype == torch.float32:
        return FP32_SHAPES[kind]
    return tuple(s for s in HALF_SHAPES[kind] if arch >= 90 or s not in HOPPER_ONLY[kind])


def prune_configs(kind: str, configs, n: int, dtype: torch.dtype, arch: int = 90):
    """The configs the autotuner tries for one call: the dtype and architecture's set, no tile taller
    or wider than the bucketed sequence (at least the smallest config survives)."""
    family = config_shapes(kind, dtype, arch)
    bucket = n_bucket(n)
    mine = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in family]
    if not mine:  # the interpreter's single config
        return configs
    fits = [c for c in mine if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= bucket]
    return fits or [min(mine, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        return prune_configs(kind, configs, named_args["N"], q.dtype, device_arch(q.device))
    return {"early_config_prune": prune}


# The autotuner keys on the bucketed N (plus the tensor dtypes, which Triton adds) and the flags
# that change the work per tile.
_TUNE_KEY = ["N_BUCKET", "HEAD_DIM", "CAUSAL", "SEE_ALL", "MODE_X", "MODE_P", "SINGLE"]


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _mix_weights(lse_p, lse_x, is_p_row, h, ThetaX, ThetaP, c_x, c_p, MODE_X: tl.constexpr, MODE_P: tl.constexpr):
    """(w, 1 - w) per row [BLOCK_M] from the natural-log LSEs and the row type's rule.

    A row seeing no prompt key gets w = 0, one seeing no instance key w = 1. For the LSE-driven
    rules 1 - w is computed as sigmoid(-x) (no cancellation when w is near 1).
    """
    has_p = lse_p > float("-inf")
    has_x = lse_x > float("-inf")
    both = has_p & has_x
    # Select finite operands first: -inf - -inf would be NaN even in the branch tl.where drops.
    diff = tl.where(both, lse_p, 0.0) - tl.where(both, lse_x, 0.0)
    dyn_w = _sigmoid(diff)
    dyn_wc = _sigmoid(-diff)
    if MODE_X == 0 or MODE_X == 1:
        w_x = dyn_w
        wc_x = dyn_wc
    elif MODE_X == 2:
        w_x = dyn_w * 0.0 + c_x
        wc_x = 1.0 - w_x
    else:
        theta = tl.load(ThetaX + h).to(tl.float32)
        w_x = dyn_w * 0.0 + _sigmoid(theta)
        wc_x = dyn_w * 0.0 + _sigmoid(-theta)
    if MODE_P == 0 or MODE_P == 1:
        w_p = dyn_w
        wc_p = dyn_wc
    elif MODE_P == 2:
        w_p = dyn_w * 0.0 + c_p
        wc_p = 1.0 - w_p
    else:
        theta = tl.load(ThetaP + h).to(tl.float32)
        w_p = dyn_w * 0.0 + _sigmoid(theta)
        wc_p = dyn_w * 0.0 + _sigmoid(-theta)
    w = tl.where(is_p_row, w_p, w_x)
    wc = tl.where(is_p_row, wc_p, wc_x)
    only = tl.where(has_p, 1.0, 0.0)
    w = tl.where(both, w, only)
    wc = tl.where(both, wc, 1.0 - only)
    return w, wc


@triton.jit
def _load_block(ptrs, offs_r, offs_d, r_hi, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """A [rows, BLOCK_D] tile; masks only what can be out of range (rows >= r_hi, d >= HEAD_DIM).
    Loops build `ptrs` once and advance them (as FlashAttention's inner loop does)."""
    if MASK_ROWS:
        return tl.load(ptrs, mask=(offs_r < r_hi)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    elif HEAD_DIM == BLOCK_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _load_rows(base, offs_r, offs_d, stride_r, stride_d, r_hi, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """The tile of rows offs_r from a base pointer and strides (outside the loops)."""
    return _load_block(base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d, offs_r, offs_d, r_hi,
                       HEAD_DIM, BLOCK_D, MASK_ROWS)


@triton.jit
def _visible(offs_m, offs_n, N, prompt_start, prompt_end, CAUSAL: tl.constexpr, SEE_ALL: tl.constexpr,
             SEGMENT: tl.constexpr):
    """[BLOCK_M, BLOCK_N] (or broadcastable): may row i see key j within the sweep's segment.

    SEGMENT 0: every key (single state); 1: instance keys only; 2: prompt keys only (the sweep
    starts at prompt_start)."""
    ok = (offs_n < N)[None, :]
    if SEGMENT == 1:
        ok = ok & ((offs_n < prompt_start) | (offs_n >= prompt_end))[None, :]
    if SEGMENT == 2:
        ok = ok & (offs_n < prompt_end)[None, :]
    if CAUSAL:
        seen = offs_n[None, :] <= offs_m[:, None]
        if SEE_ALL:
            seen = seen | ((offs_m >= prompt_start) & (offs_m < prompt_end))[:, None]
        ok = ok & seen
    return ok


@triton.jit
def _visible_keys_end(tile_start, N, prompt_start, prompt_end,
                      CAUSAL: tl.constexpr, SEE_ALL: tl.constexpr, BLOCK_M: tl.constexpr):
    """One past the last key column any row of the query tile may see (causal block skipping)."""
    end = N
    if CAUSAL:
        end = tl.minimum(N, tile_start + BLOCK_M)
        if SEE_ALL:
            holds_prompt_rows = (prompt_start < tile_start + BLOCK_M) & (prompt_end > tile_start) & (
                prompt_end > prompt_start)
            end = tl.where(holds_prompt_rows, N, end)
    return end


@triton.jit
def _key_runs(tile_start, N, prompt_start, prompt_end, CAUSAL: tl.constexpr, SEE_ALL: tl.constexpr,
              SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key blocks a query tile visits, in four runs of block-aligned column offsets:
    unmasked [0, a), masked [a, b), unmasked [c, u), masked [e, t).

    Unmasked blocks hold no prompt column (when SPLIT), no causal boundary and no padding: every
    row of the tile sees every key. The runs cover [0, t) (t: blocks up to the tile's last visible
    key) exactly once.
    """
    t = tl.cdiv(_visible_keys_end(tile_start, N, prompt_start, prompt_end, CAUSAL, SEE_ALL, BLOCK_M), BLOCK_N)
    lim = N
    if CAUSAL:
        lim = tl.minimum(N, tile_start + 1)
    u = lim // BLOCK_N
    if SPLIT:
        has_prompts = prompt_end > prompt_start
        pb0 = tl.where(has_prompts, prompt_start // BLOCK_N, u)
        pb1 = tl.where(has_prompts, tl.cdiv(prompt_end, BLOCK_N), u)
    else:
        pb0 = u
        pb1 = u
    a = tl.minimum(pb0, u)
    b = tl.minimum(pb1, t)
    e = tl.maximum(u, pb1)
    return a * BLOCK_N, b * BLOCK_N, pb1 * BLOCK_N, u * BLOCK_N, e * BLOCK_N, t * BLOCK_N


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _fwd_sweep(q, m_i, l_i, acc, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, lo, hi,
               N, prompt_start, prompt_end, qk_scale,
               CAUSAL: tl.constexpr, SEE_ALL: tl.constexpr, SEGMENT: tl.constexpr, MASKED: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over the key blocks starting in [lo, hi) (base-2 scores); returns (m, l, acc).

    Unmasked steps are the FlashAttention inner loop; masked steps add the visibility predicate
    and keep m = -inf for a row that has seen no key yet (subtracting 0 instead: no inf - inf).
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_ptrs = k_base + offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_base + offs_n0[:, None] * stride_vn + offs_d[None, :] * stride_vd
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_block(k_ptrs + start_n * stride_kn, offs_n, offs_d, N, HEAD_DIM, BLOCK_D, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED:
            s = tl.where(_visible(offs_m, offs_n, N, prompt_start, prompt_end, CAUSAL, SEE_ALL, SEGMENT),
                         s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_block(v_ptrs + start_n * stride_vn, offs_n, offs_d, N, HEAD_DIM, BLOCK_D, MASKED)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _instance_sweep(q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, tile_start, N,
                    prompt_start, prompt_end, qk_scale,
                    CAUSAL: tl.constexpr, SEE_ALL: tl.constexpr, SEGMENT: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """The (m, l, acc) state over the instance keys (SEGMENT 1) or over every key (SEGMENT 0)."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    a, b, c, u, e, t = _key_runs(tile_start, N, prompt_start, prompt_end, CAUSAL, SEE_ALL, SEGMENT == 1,
                                 BLOCK_M, BLOCK_N)
    args = (k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m)
    m_i, l_i, acc = _fwd_sweep(q, m_i, l_i, acc, *args, 0, a, N, prompt_start, prompt_end, qk_scale,
                               CAUSAL, SEE_ALL, SEGMENT, False, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
    if SEGMENT == 1:  # the runs around the prompt columns (empty without a prompt split)
        m_i, l_i, acc = _fwd_sweep(q, m_i, l_i, acc, *args, a, b, N, prompt_start, prompt_end, qk_scale,
                                   CAUSAL, SEE_ALL, SEGMENT, True, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
        m_i, l_i, acc = _fwd_sweep(q, m_i, l_i, acc, *args, c, u, N, prompt_start, prompt_end, qk_scale,
                                   CAUSAL, SEE_ALL, SEGMENT, False, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
    m_i, l_i, acc = _fwd_sweep(q, m_i, l_i, acc, *args, e, t, N, prompt_start, prompt_end, qk_scale,
                               CAUSAL, SEE_ALL, SEGMENT, True, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
    return m_i, l_i, acc


@triton.jit
def _finish_state(m_i, l_i, acc):
    """(normalised output, base-2 LSE) of a state; 0 and -inf for a row that saw no key."""
    seen = l_i > 0.0
    lse2 = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    return acc / tl.where(seen, l_i, 1.0)[:, None], lse2


@triton.autotune(configs=_configs("fwd"), key=_TUNE_KEY, prune_configs_by=_pruner("fwd"))
@triton.jit
def _forward_kernel(
    Q, K, V, Out, OMinor, Lse, ThetaX, ThetaP,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_mb, stride_mh, stride_mn, stride_md,
    H, N, N_BUCKET, prompt_start, prompt_end, qk_scale, c_x, c_p,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, SEE_ALL: tl.constexpr, MODE_X: tl.constexpr,
    MODE_P: tl.constexpr, SINGLE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (B * H, cdiv(N, BLOCK_M)). Out / OMinor [B, H, N, D] through their strides.

    Lse: fp32 [1, B*H*N] (SINGLE: the LSE over all keys) or [2, B*H*N] (LSE_P, LSE_X).
    OMinor is written only when a rule is not exact (MODE_X or MODE_P != 0)."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    tile_start = pid_m * BLOCK_M
    offs_m = tile_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    tile_mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = _load_rows(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, offs_m, offs_d, stride_qn,
                   stride_qd, N, HEAD_DIM, BLOCK_D, True)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    row = pid_bh.to(tl.int64) * N + offs_m
    o_ptrs = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_on \
        + offs_d[None, :] * stride_od
    if SINGLE:
        m_a, l_a, acc_a = _instance_sweep(q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m,
                                          tile_start, N, prompt_start, prompt_end, qk_scale, CAUSAL, SEE_ALL, 0,
                                          HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        out, lse2 = _finish_state(m_a, l_a, acc_a)
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=tile_mask)
        tl.store(Lse + row, lse2 * 0.6931471805599453, mask=m_ok)
    else:
        m_x, l_x, acc_x = _instance_sweep(q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m,
                                          tile_start, N, prompt_start, prompt_end, qk_scale, CAUSAL, SEE_ALL, 1,
                                          HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        # The prompt sweep: narrow blocks over [prompt_start, prompt_end) (nothing when there are none).
        m_p = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_p = tl.zeros([BLOCK_M], tl.float32)
        acc_p = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        end = _visible_keys_end(tile_start, N, prompt_start, prompt_end, CAUSAL, SEE_ALL, BLOCK_M)
        m_p, l_p, acc_p = _fwd_sweep(q, m_p, l_p, acc_p, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                     offs_m, prompt_start, tl.minimum(prompt_end, end), N, prompt_start, prompt_end,
                                     qk_scale, CAUSAL, SEE_ALL, 2, True, HEAD_DIM, BLOCK_P, BLOCK_D, PRECISION)
        o_x, lse2_x = _finish_state(m_x, l_x, acc_x)
        o_p, lse2_p = _finish_state(m_p, l_p, acc_p)
        lse_p = lse2_p * 0.6931471805599453
        lse_x = lse2_x * 0.6931471805599453
        is_p_row = (offs_m >= prompt_start) & (offs_m < prompt_end)
        w, wc = _mix_weights(lse_p, lse_x, is_p_row, h, ThetaX, ThetaP, c_x, c_p, MODE_X, MODE_P)
        out = wc[:, None] * o_x + w[:, None] * o_p
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=tile_mask)
        plane = tl.num_programs(0).to(tl.int64) * N
        tl.store(Lse + row, lse_p, mask=m_ok)
        tl.store(Lse + plane + row, lse_x, mask=m_ok)
        if MODE_X != 0 or MODE_P != 0:
            # The smaller share's segment output: the backward divides by the larger share (>= 1/2).
            o_minor = tl.where((w <= 0.5)[:, None], o_p, o_x)
            tl.store(OMinor + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh + offs_m[:, None] * stride_mn
                     + offs_d[None, :] * stride_md, o_minor.to(OMinor.dtype.element_ty), mask=tile_mask)


# ----------------------------------------------------------------------------------------------
# Backward: dQ (with the per-row statistics)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _dq_sweep(q, do, dq, stat, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, lo, hi,
              N, prompt_start, prompt_end, qk_scale,
              CAUSAL: tl.constexpr, SEE_ALL: tl.constexpr, SEGMENT: tl.constexpr, MASKED: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """dq += sum over the key blocks starting in [lo, hi) of dS K (3 GEMMs, one exp2 per block)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_ptrs = k_base + offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_base + offs_n0[:, None] * stride_vn + offs_d[None, :] * stride_vd
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_block(k_ptrs + start_n * stride_kn, offs_n, offs_d, N, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_block(v_ptrs + start_n * stride_vn, offs_n, offs_d, N, HEAD_DIM, BLOCK_D, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.exp2(s * qk_scale - stat[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m, offs_n, N, prompt_start, prompt_end, CAUSAL, SEE_ALL, SEGMENT), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_configs("dq"), key=_TUNE_KEY, prune_configs_by=_pruner("dq"))
@triton.jit
def _backward_dq_kernel(
    Q, K, V, Out, DOut, OMinor, Lse, ThetaX, ThetaP, Stats, DW, DQ,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_mb, stride_mh, stride_mn, stride_md,
    stride_db, stride_dh, stride_dn, stride_dd,
    H, N, N_BUCKET, prompt_start, prompt_end, qk_scale, sm_scale, c_x, c_p,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, SEE_ALL: tl.constexpr, MODE_X: tl.constexpr,
    MODE_P: tl.constexpr, SINGLE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (B * H, cdiv(N, BLOCK_M)): dQ of one query tile, and the tile's row statistics.

    Stats fp32 [4, B*H*N] = (stat_P, stat_X, Delta_P, Delta_X) (SINGLE: [2, ...] = (stat, Delta)),
    stat in base 2 with the segment's share folded in (+inf where the share is 0: p = 0).
    DW fp32 [2, B*H*N] (learned rules): w (1 - w) dL/dw of the instance rows / of the prompt rows.
    Out, OMinor, DOut, DQ through their own strides (stride_o*, stride_m*, stride_g*, stride_d*)."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    tile_start = pid_m * BLOCK_M
    offs_m = tile_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q = _load_rows(Q + b64 * stride_qb + h64 * stride_qh, offs_m, offs_d, stride_qn, stride_qd, N, HEAD_DIM,
                   BLOCK_D, True)
    do = _load_rows(DOut + b64 * stride_gb + h64 * stride_gh, offs_m, offs_d, stride_gn, stride_gd, N, HEAD_DIM,
                    BLOCK_D, True)
    out = _load_rows(Out + b64 * stride_ob + h64 * stride_oh, offs_m, offs_d, stride_on, stride_od, N, HEAD_DIM,
                     BLOCK_D, True)
    do32 = do.to(tl.float32)
    delta_out = tl.sum(do32 * out.to(tl.float32), 1)
    row = pid_bh.to(tl.int64) * N + offs_m
    plane = tl.num_programs(0).to(tl.int64) * N
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if SINGLE:
        lse = tl.load(Lse + row, mask=m_ok, other=float("-inf"))
        stat = tl.where(m_ok, lse * 1.4426950408889634, float("inf"))
        tl.store(Stats + row, stat, mask=m_ok)
        tl.store(Stats + plane + row, delta_out, mask=m_ok)
        a, b_, c, u, e, t = _key_runs(tile_start, N, prompt_start, prompt_end, CAUSAL, SEE_ALL, False,
                                      BLOCK_M, BLOCK_N)
        args = (k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m)
        dq = _dq_sweep(q, do, dq, stat, delta_out, *args, 0, a, N, prompt_start, prompt_end, qk_scale,
                       CAUSAL, SEE_ALL, 0, False, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
        dq = _dq_sweep(q, do, dq, stat, delta_out, *args, e, t, N, prompt_start, prompt_end, qk_scale,
                       CAUSAL, SEE_ALL, 0, True, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
    else:
        lse_p = tl.load(Lse + row, mask=m_ok, other=float("-inf"))
        lse_x = tl.load(Lse + plane + row, mask=m_ok, other=float("-inf"))
        is_p_row = (offs_m >= prompt_start) & (offs_m < prompt_end)
        w, wc = _mix_weights(lse_p, lse_x, is_p_row, h, ThetaX, ThetaP, c_x, c_p, MODE_X, MODE_P)
        if MODE_X == 0 and MODE_P == 0:
            delta_p = delta_out
            delta_x = delta_out
        else:
            o_minor = _load_rows(OMinor + b64 * stride_mb + h64 * stride_mh, offs_m, offs_d, stride_mn, stride_md,
                                 N, HEAD_DIM, BLOCK_D, True)
            d_minor = tl.sum(do32 * o_minor.to(tl.float32), 1)
            # dO.out = (1 - w) dO.O_X + w dO.O_P: the major segment's term from the minor one.
            minor_is_p = w <= 0.5
            raw_p = tl.where(minor_is_p, d_minor, (delta_out - wc * d_minor) / tl.where(minor_is_p, 1.0, w))
            raw_x = tl.where(minor_is_p, (delta_out - w * d_minor) / tl.where(minor_is_p, wc, 1.0), d_minor)
            row_mode = tl.where(is_p_row, MODE_P, MODE_X)
            row_exact = row_mode == 0
            delta_p = tl.where(row_exact, delta_out, raw_p)
            delta_x = tl.where(row_exact, delta_out, raw_x)
            if MODE_X == 3 or MODE_P == 3:
                both = (lse_p > float("-inf")) & (lse_x > float("-inf"))
                dw = tl.where((row_mode == 3) & both & m_ok, w * wc * (raw_p - raw_x), 0.0)
                tl.store(DW + row, tl.where(is_p_row, 0.0, dw), mask=m_ok)
                tl.store(DW + plane + row, tl.where(is_p_row, dw, 0.0), mask=m_ok)
        stat_p = tl.where((w > 0.0) & m_ok, lse_p * 1.4426950408889634 - tl.log2(tl.where(w > 0.0, w, 1.0)),
                          float("inf"))
        stat_x = tl.where((wc > 0.0) & m_ok, lse_x * 1.4426950408889634 - tl.log2(tl.where(wc > 0.0, wc, 1.0)),
                          float("inf"))
        tl.store(Stats + row, stat_p, mask=m_ok)
        tl.store(Stats + plane + row, stat_x, mask=m_ok)
        tl.store(Stats + 2 * plane + row, delta_p, mask=m_ok)
        tl.store(Stats + 3 * plane + row, delta_x, mask=m_ok)

        a, b_, c, u, e, t = _key_runs(tile_start, N, prompt_start, prompt_end, CAUSAL, SEE_ALL, True,
                                      BLOCK_M, BLOCK_N)
        args = (k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m)
        dq = _dq_sweep(q, do, dq, stat_x, delta_x, *args, 0, a, N, prompt_start, prompt_end, qk_scale,
                       CAUSAL, SEE_ALL, 1, False, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
        dq = _dq_sweep(q, do, dq, stat_x, delta_x, *args, a, b_, N, prompt_start, prompt_end, qk_scale,
                       CAUSAL, SEE_ALL, 1, True, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
        dq = _dq_sweep(q, do, dq, stat_x, delta_x, *args, c, u, N, prompt_start, prompt_end, qk_scale,
                       CAUSAL, SEE_ALL, 1, False, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
        dq = _dq_sweep(q, do, dq, stat_x, delta_x, *args, e, t, N, prompt_start, prompt_end, qk_scale,
                       CAUSAL, SEE_ALL, 1, True, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
        end = _visible_keys_end(tile_start, N, prompt_start, prompt_end, CAUSAL, SEE_ALL, BLOCK_M)
        dq = _dq_sweep(q, do, dq, stat_p, delta_p, *args, prompt_start, tl.minimum(prompt_end, end), N,
                       prompt_start, prompt_end, qk_scale, CAUSAL, SEE_ALL, 2, True, HEAD_DIM, BLOCK_P, BLOCK_D,
                       PRECISION)
    tl.store(DQ + b64 * stride_db + h64 * stride_dh + offs_m[:, None] * stride_dn + offs_d[None, :] * stride_dd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


# ----------------------------------------------------------------------------------------------
# Backward: dK, dV
# ----------------------------------------------------------------------------------------------

@triton.jit
def _dkdv_sweep(k, v, dk, dv, is_p_col, q_base, do_base, stride_qn, stride_qd, stride_gn, stride_gd, Stats, stat_row0,
                plane, offs_n, lo, hi, row_hi, prompt_start, prompt_end, qk_scale,
                CAUSAL: tl.constexpr, SEE_ALL: tl.constexpr, MASKED: tl.constexpr, MIXED: tl.constexpr,
                SINGLE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr):
    """dK, dV of one key block over the query tiles starting in [lo, hi) (rows < row_hi).

    Transposed tiles [BLOCK_N, BLOCK_M]: keys along rows. Unmasked steps are FlashAttention-2's
    dK/dV loop (4 GEMMs, one exp2); masked steps add the causal predicate (padded rows have
    stat = +inf, so p = 0 there); MIXED steps select each column's segment statistics."""
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if SINGLE:
        stat_plane = 0
        delta_plane = plane
    else:
        stat_plane = plane
        delta_plane = 3 * plane
    # Tile pointers built once; each iteration only advances them (as FlashAttention's loop does).
    q_ptrs = q_base + offs_m0[:, None] * stride_qn + offs_d[None, :] * stride_qd
    do_ptrs = do_base + offs_m0[:, None] * stride_gn + offs_d[None, :] * stride_gd
    stat_ptrs = Stats + stat_plane + stat_row0 + offs_m0
    delta_ptrs = Stats + delta_plane + stat_row0 + offs_m0
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_block(q_ptrs + start_m * stride_qn, offs_m, offs_d, row_hi, HEAD_DIM, BLOCK_D, MASKED)
        do = _load_block(do_ptrs + start_m * stride_gn, offs_m, offs_d, row_hi, HEAD_DIM, BLOCK_D, MASKED)
        if MASKED:
            m_ok = offs_m < row_hi
            stat_x = tl.load(stat_ptrs + start_m, mask=m_ok, other=float("inf"))
            delta_x = tl.load(delta_ptrs + start_m, mask=m_ok, other=0.0)
        else:
            stat_x = tl.load(stat_ptrs + start_m)
            delta_x = tl.load(delta_ptrs + start_m)
        rows = stat_row0 + offs_m
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        if MIXED:
            stat_p = tl.load(Stats + rows, mask=m_ok, other=float("inf"))
            delta_p = tl.load(Stats + 2 * plane + rows, mask=m_ok, other=0.0)
            stat = tl.where(is_p_col[:, None], stat_p[None, :], stat_x[None, :])
            delta = tl.where(is_p_col[:, None], delta_p[None, :], delta_x[None, :])
        else:
            stat = stat_x[None, :]
            delta = delta_x[None, :]
        p_t = tl.exp2(s_t * qk_scale - stat)
        if MASKED and CAUSAL:
            seen = offs_n[:, None] <= offs_m[None, :]
            if SEE_ALL:
                seen = seen | ((offs_m >= prompt_start) & (offs_m < prompt_end))[None, :]
            p_t = tl.where(seen, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_configs("dkdv"), key=_TUNE_KEY, prune_configs_by=_pruner("dkdv"))
@triton.jit
def _backward_dkdv_kernel(
    Q, K, V, DOut, Stats, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_kgb, stride_kgh, stride_kgn, stride_kgd,
    stride_vgb, stride_vgh, stride_vgn, stride_vgd,
    H, N, N_BUCKET, prompt_start, prompt_end, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, SEE_ALL: tl.constexpr, MODE_X: tl.constexpr,
    MODE_P: tl.constexpr, SINGLE: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (B * H, cdiv(N, BLOCK_N)): dK, dV of one key block (through their strides)."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = _load_rows(K + b64 * stride_kb + h64 * stride_kh, offs_n, offs_d, stride_kn, stride_kd, N, HEAD_DIM,
                   BLOCK_D, True)
    v = _load_rows(V + b64 * stride_vb + h64 * stride_vh, offs_n, offs_d, stride_vn, stride_vd, N, HEAD_DIM,
                   BLOCK_D, True)
    is_p_col = (offs_n >= prompt_start) & (offs_n < prompt_end)
    q_base = Q + b64 * stride_qb + h64 * stride_qh
    do_base = DOut + b64 * stride_gb + h64 * stride_gh
    stat_row0 = pid_bh.to(tl.int64) * N
    plane = tl.num_programs(0).to(tl.int64) * N
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Query tiles that see this key block: from its diagonal tile on (causal) or all; tiles past
    # the diagonal and inside N are unmasked. Under causal masking with prompt rows that see all
    # keys, the prompt rows before the diagonal tile come first (`lead`).
    n_pad = tl.cdiv(N, BLOCK_M) * BLOCK_M
    first = 0
    r_u0 = 0
    if CAUSAL:
        first = (start_n // BLOCK_M) * BLOCK_M
        r_u0 = tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    r_u1 = (N // BLOCK_M) * BLOCK_M
    lead_hi = prompt_start
    if CAUSAL and SEE_ALL:
        lead_hi = tl.minimum(prompt_end, first)
    args = (q_base, do_base, stride_qn, stride_qd, stride_gn, stride_gd, Stats, stat_row0, plane, offs_n)
    mixed = False
    if not SINGLE:
        mixed = (start_n < prompt_end) & (start_n + BLOCK_N > prompt_start) & (prompt_end > prompt_start)
    if mixed:
        dk, dv = _dkdv_sweep(k, v, dk, dv, is_p_col, *args, prompt_start, lead_hi, lead_hi, prompt_start, prompt_end,
                             qk_scale, CAUSAL, SEE_ALL, True, True, SINGLE, HEAD_DIM, BLOCK_M, BLOCK_D, PRECISION)
        dk, dv = _dkdv_sweep(k, v, dk, dv, is_p_col, *args, first, n_pad, N, prompt_start, prompt_end,
                             qk_scale, CAUSAL, SEE_ALL, True, True, SINGLE, HEAD_DIM, BLOCK_M, BLOCK_D, PRECISION)
    else:
        dk, dv = _dkdv_sweep(k, v, dk, dv, is_p_col, *args, prompt_start, lead_hi, lead_hi, prompt_start, prompt_end,
                             qk_scale, CAUSAL, SEE_ALL, True, False, SINGLE, HEAD_DIM, BLOCK_M, BLOCK_D, PRECISION)
        dk, dv = _dkdv_sweep(k, v, dk, dv, is_p_col, *args, first, tl.minimum(r_u0, n_pad), N, prompt_start,
                             prompt_end, qk_scale, CAUSAL, SEE_ALL, True, False, SINGLE, HEAD_DIM, BLOCK_M, BLOCK_D,
                             PRECISION)
        dk, dv = _dkdv_sweep(k, v, dk, dv, is_p_col, *args, r_u0, r_u1, N, prompt_start, prompt_end,
                             qk_scale, CAUSAL, SEE_ALL, False, False, SINGLE, HEAD_DIM, BLOCK_M, BLOCK_D, PRECISION)
        dk, dv = _dkdv_sweep(k, v, dk, dv, is_p_col, *args, tl.maximum(r_u0, r_u1), n_pad, N, prompt_start,
                             prompt_end, qk_scale, CAUSAL, SEE_ALL, True, False, SINGLE, HEAD_DIM, BLOCK_M, BLOCK_D,
                             PRECISION)
    tl.store(DK + b64 * stride_kgb + h64 * stride_kgh + offs_n[:, None] * stride_kgn + offs_d[None, :] * stride_kgd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b64 * stride_vgb + h64 * stride_vgh + offs_n[:, None] * stride_vgn + offs_d[None, :] * stride_vgd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------------------------
# Launchers (the views in, the views out: nothing is copied)
# ----------------------------------------------------------------------------------------------

def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _block_p(num_prompts: int) -> int:
    # The prompt sweep's key block: just wide enough for the usual 4..16 prompts.
    return min(64, max(16, triton.next_power_of_2(max(num_prompts, 1))))


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs: 3xTF32 tensor-core dots on a GPU (about fp32's accuracy at tensor-core speed);
    # the interpreter computes fp32 dots exactly anyway.
    if dtype != torch.float32:
        return "tf32"  # unused: fp16/bf16 operands
    return "ieee" if INTERPRETED else "tf32x3"


def _new(shape, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def empty_in_stride_order(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An uninitialised dense tensor of t's shape whose memory order follows t's strides.

    For q = a [B, H, N, D] view of a packed [B, N, 3, H, D] projection this is a [B, N, H, D]
    buffer seen as [B, H, N, D]: the caller's transpose(1, 2).reshape(B, N, H*D) is then free.
    """
    order = sorted(range(t.dim()), key=lambda i: (-t.stride(i), i))
    base = _new([t.shape[i] for i in order], t, dtype or t.dtype)
    inverse = [order.index(i) for i in range(t.dim())]
    return base.permute(inverse)


def _strides(t: torch.Tensor):
    return tuple(t.stride())


def _theta_ptrs(theta_x, theta_p, fallback):
    # Unused pointer arguments still need a tensor; any does.
    return (theta_x if theta_x is not None else fallback), (theta_p if theta_p is not None else fallback)


def _launch_forward(q, k, v, out, lse, o_minor, theta_x, theta_p, prompt_start, num_prompts, causal, see_all,
                    mode_x, mode_p, c_x, c_p, scale, single):
    b, h, n, d = q.shape
    see_all = see_all and num_prompts > 0
    m = o_minor if o_minor.numel() else out  # unused when every rule is exact: out's strides fill the slots
    tx, tp = _theta_ptrs(theta_x, theta_p, lse)
    # Batch x heads on grid axis 0 (up to 2^31 - 1 programs; axis 1 stops at 65535).
    grid = lambda meta: (b * h, triton.cdiv(n, meta["BLOCK_M"]))  # noqa: E731
    _forward_kernel[grid](
        q, k, v, out, m, lse, tx, tp,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(m),
        h, n, n_bucket(n), prompt_start, prompt_start + num_prompts, scale * _LOG2E, float(c_x), float(c_p),
        HEAD_DIM=d, CAUSAL=causal, SEE_ALL=see_all, MODE_X=mode_x, MODE_P=mode_p, SINGLE=single,
        BLOCK_P=_block_p(num_prompts), BLOCK_D=_block_d(d), PRECISION=_dot_precision(q.dtype),
    )


def _launch_backward(dout, q, k, v, out, lse, o_minor, dq, dk, dv, dw, theta_x, theta_p, prompt_start, num_prompts,
                     causal, see_all, mode_x, mode_p, c_x, c_p, scale, single):
    b, h, n, d = q.shape
    see_all = see_all and num_prompts > 0
    stats = _new((2 if single else 4, b * h * n), q, torch.float32)
    m = o_minor if o_minor.numel() else out
    dw_ptr = dw if dw.numel() else stats
    tx, tp = _theta_ptrs(theta_x, theta_p, stats)
    prompt_end = prompt_start + num_prompts
    common = dict(HEAD_DIM=d, CAUSAL=causal, SEE_ALL=see_all, MODE_X=mode_x, MODE_P=mode_p, SINGLE=single,
                  BLOCK_D=_block_d(d), PRECISION=_dot_precision(q.dtype))
    grid_m = lambda meta: (b * h, triton.cdiv(n, meta["BLOCK_M"]))  # noqa: E731
    _backward_dq_kernel[grid_m](
        q, k, v, out, dout, m, lse, tx, tp, stats, dw_ptr, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(dout), *_strides(m), *_strides(dq),
        h, n, n_bucket(n), prompt_start, prompt_end, scale * _LOG2E, scale, float(c_x), float(c_p),
        BLOCK_P=_block_p(num_prompts), **common,
    )
    grid_n = lambda meta: (b * h, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _backward_dkdv_kernel[grid_n](
        q, k, v, dout, stats, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *_strides(dv),
        h, n, n_bucket(n), prompt_start, prompt_end, scale * _LOG2E, scale, **common,
    )


def _forward_buffers(q, out, mode_x, mode_p, single):
    """(lse, o_minor) for one forward: lse fp32 [1 or 2, B, H, N]; o_minor like out, or empty."""
    b, h, n, _ = q.shape
    lse = _new((1 if single else 2, b, h, n), q, torch.float32)
    needs_minor = not single and (mode_x != MODE_EXACT or mode_p != MODE_EXACT)
    o_minor = empty_in_stride_order(out) if needs_minor else q.new_empty(0)
    return lse, o_minor


def _run_forward(q, k, v, out, theta_x, theta_p, prompt_start, num_prompts, causal, see_all, mode_x, mode_p,
                 c_x, c_p, scale, single):
    lse, o_minor = _forward_buffers(q, out, mode_x, mode_p, single)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
    else:
        _launch_forward(q, k, v, out, lse, o_minor, theta_x, theta_p, prompt_start, num_prompts, causal, see_all,
                        mode_x, mode_p, c_x, c_p, scale, single)
    return lse, o_minor


def _theta_grad_buffer(q, mode_x, mode_p):
    b, h, n, _ = q.shape
    learned = MODE_LEARNED in (mode_x, mode_p)
    return _new((2, b, h, n), q, torch.float32) if learned else q.new_empty(0, dtype=torch.float32)


def _run_backward(dout, q, k, v, out, lse, o_minor, dq, dk, dv, theta_x, theta_p, prompt_start, num_prompts,
                  causal, see_all, mode_x, mode_p, c_x, c_p, scale, single):
    """Fills dq, dk, dv (views, any strides); returns d theta [2, H] fp32 (or an empty tensor)."""
    dw = _theta_grad_buffer(q, mode_x, mode_p)
    if dq.numel() == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dw.new_zeros((2, q.shape[1])) if MODE_LEARNED in (mode_x, mode_p) else dw
    _launch_backward(dout, q, k, v, out, lse, o_minor, dq, dk, dv, dw, theta_x, theta_p, prompt_start, num_prompts,
                     causal, see_all, mode_x, mode_p, c_x, c_p, scale, single)
    # One deterministic reduction: [2 row types, B, H, N] -> [2, H].
    return dw.sum(dim=(1, 3)) if dw.numel() else dw


# ----------------------------------------------------------------------------------------------
# Torch custom ops (eager, autograd and torch.compile)
# ----------------------------------------------------------------------------------------------
# Scalars shared by both ops: prompt_start, num_prompts, causal, prompt_rows_see_all, instance_mode,
# prompt_mode, instance_c, prompt_c, scale, single.
_NUM_SCALAR_ARGS = 10


@torch.library.custom_op("fastprompt::decoupled_attention_fwd", mutates_args=())
def decoupled_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    instance_theta: Optional[torch.Tensor], prompt_theta: Optional[torch.Tensor],
    prompt_start: int, num_prompts: int, causal: bool, prompt_rows_see_all: bool,
    instance_mode: int, prompt_mode: int, instance_c: float, prompt_c: float, scale: float, single: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, H, N, D] in q's dtype and memory order, lse fp32 [1 or 2, B, H, N], o_minor or empty)."""
    out = empty_in_stride_order(q)
    lse, o_minor = _run_forward(q, k, v, out, instance_theta, prompt_theta, prompt_start, num_prompts, causal,
                                prompt_rows_see_all, instance_mode, prompt_mode, instance_c, prompt_c, scale, single)
    return out, lse, o_minor


@decoupled_attention_fwd.register_fake
def _(q, k, v, instance_theta, prompt_theta, prompt_start, num_prompts, causal, prompt_rows_see_all,
      instance_mode, prompt_mode, instance_c, prompt_c, scale, single):
    out = empty_in_stride_order(q)
    lse, o_minor = _forward_buffers(q, out, instance_mode, prompt_mode, single)
    return out, lse, o_minor


@torch.library.custom_op("fastprompt::decoupled_attention_bwd", mutates_args=())
def decoupled_attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, o_minor: torch.Tensor,
    instance_theta: Optional[torch.Tensor], prompt_theta: Optional[torch.Tensor],
    prompt_start: int, num_prompts: int, causal: bool, prompt_rows_see_all: bool,
    instance_mode: int, prompt_mode: int, instance_c: float, prompt_c: float, scale: float, single: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV in the memory order of q, k, v; d theta fp32 [2, H] (instance, prompt) or empty)."""
    dq, dk, dv = (empty_in_stride_order(t) for t in (q, k, v))
    dtheta = _run_backward(dout, q, k, v, out, lse, o_minor, dq, dk, dv, instance_theta, prompt_theta, prompt_start,
                           num_prompts, causal, prompt_rows_see_all, instance_mode, prompt_mode, instance_c, prompt_c,
                           scale, single)
    return dq, dk, dv, dtheta


@decoupled_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, o_minor, instance_theta, prompt_theta, prompt_start, num_prompts, causal,
      prompt_rows_see_all, instance_mode, prompt_mode, instance_c, prompt_c, scale, single):
    grads = [empty_in_stride_order(t) for t in (q, k, v)]
    return (*grads, _dtheta_fake(q.new_empty(0), q.shape[1], instance_mode, prompt_mode))


def _dtheta_fake(like, num_heads, mode_x, mode_p):
    learned = MODE_LEARNED in (mode_x, mode_p)
    return like.new_empty((2, num_heads) if learned else (0,), dtype=torch.float32)


def _theta_grads(dtheta, instance_theta, prompt_theta):
    gx = dtheta[0].to(instance_theta.dtype) if instance_theta is not None else None
    gp = dtheta[1].to(prompt_theta.dtype) if prompt_theta is not None else None
    return gx, gp


def _setup_context(ctx, inputs, output):
    q, k, v, instance_theta, prompt_theta, *scalars = inputs
    out, lse, o_minor = output
    ctx.save_for_backward(q, k, v, out, lse, o_minor, instance_theta, prompt_theta)
    ctx.scalars = tuple(scalars)
    ctx.mark_non_differentiable(lse, o_minor)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for lse / o_minor (two memsets per call)


def _autograd_backward(ctx, dout, _dlse, _dminor):
    if dout is None:
        return (None,) * (5 + _NUM_SCALAR_ARGS)
    q, k, v, out, lse, o_minor, instance_theta, prompt_theta = ctx.saved_tensors
    dq, dk, dv, dtheta = decoupled_attention_bwd(dout, q, k, v, out, lse, o_minor, instance_theta, prompt_theta,
                                                 *ctx.scalars)
    return (dq, dk, dv, *_theta_grads(dtheta, instance_theta, prompt_theta)) + (None,) * _NUM_SCALAR_ARGS


decoupled_attention_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


def _packed_views(qkv: torch.Tensor, num_heads: int, seq_first: bool):
    """Three [B, H, N, D] views of a packed projection [B, N, 3E] or [N, B, 3E] (never a copy)."""
    head_dim = qkv.shape[-1] // (3 * num_heads)
    parts = qkv.unflatten(-1, (3, num_heads, head_dim))  # splitting a dim is always a view
    order = (2, 1, 3, 0, 4) if seq_first else (2, 0, 3, 1, 4)
    return parts.permute(order).unbind(0)


def _heads_view(x: torch.Tensor, num_heads: int, seq_first: bool) -> torch.Tensor:
    """[B, N, E] or [N, B, E] -> a [B, H, N, D] view."""
    heads = x.unflatten(-1, (num_heads, x.shape[-1] // num_heads))
    return heads.permute(1, 2, 0, 3) if seq_first else heads.permute(0, 2, 1, 3)


@torch.library.custom_op("fastprompt::decoupled_attention_qkv_fwd", mutates_args=())
def decoupled_attention_qkv_fwd(
    qkv: torch.Tensor, num_heads: int, seq_first: bool,
    instance_theta: Optional[torch.Tensor], prompt_theta: Optional[torch.Tensor],
    prompt_start: int, num_prompts: int, causal: bool, prompt_rows_see_all: bool,
    instance_mode: int, prompt_mode: int, instance_c: float, prompt_c: float, scale: float, single: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, N, E] or [N, B, E] contiguous, lse, o_minor) from the packed projection."""
    q, k, v = _packed_views(qkv, num_heads, seq_first)
    out = qkv.new_empty(qkv.shape[:-1] + (qkv.shape[-1] // 3,))
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    lse, o_minor = _run_forward(q, k, v, _heads_view(out, num_heads, seq_first), instance_theta, prompt_theta,
                                prompt_start, num_prompts, causal, prompt_rows_see_all, instance_mode, prompt_mode,
                                instance_c, prompt_c, scale, single)
    return out, lse, o_minor


@decoupled_attention_qkv_fwd.register_fake
def _(qkv, num_heads, seq_first, instance_theta, prompt_theta, prompt_start, num_prompts, causal, prompt_rows_see_all,
      instance_mode, prompt_mode, instance_c, prompt_c, scale, single):
    q, _, _ = _packed_views(qkv, num_heads, seq_first)
    out = qkv.new_empty(qkv.shape[:-1] + (qkv.shape[-1] // 3,))
    lse, o_minor = _forward_buffers(q, _heads_view(out, num_heads, seq_first), instance_mode, prompt_mode, single)
    return out, lse, o_minor


@torch.library.custom_op("fastprompt::decoupled_attention_qkv_bwd", mutates_args=())
def decoupled_attention_qkv_bwd(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, o_minor: torch.Tensor,
    num_heads: int, seq_first: bool,
    instance_theta: Optional[torch.Tensor], prompt_theta: Optional[torch.Tensor],
    prompt_start: int, num_prompts: int, causal: bool, prompt_rows_see_all: bool,
    instance_mode: int, prompt_mode: int, instance_c: float, prompt_c: float, scale: float, single: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dqkv in qkv's shape, contiguous; d theta fp32 [2, H] or empty). dout is read with its own strides."""
    q, k, v = _packed_views(qkv, num_heads, seq_first)
    dqkv = qkv.new_empty(qkv.shape)
    if POISON_OUTPUTS:
        dqkv.fill_(float("nan"))
    dq, dk, dv = _packed_views(dqkv, num_heads, seq_first)
    dtheta = _run_backward(_heads_view(dout, num_heads, seq_first), q, k, v, _heads_view(out, num_heads, seq_first),
                           lse, o_minor, dq, dk, dv, instance_theta, prompt_theta, prompt_start, num_prompts, causal,
                           prompt_rows_see_all, instance_mode, prompt_mode, instance_c, prompt_c, scale, single)
    return dqkv, dtheta


@decoupled_attention_qkv_bwd.register_fake
def _(dout, qkv, out, lse, o_minor, num_heads, seq_first, instance_theta, prompt_theta, prompt_start, num_prompts,
      causal, prompt_rows_see_all, instance_mode, prompt_mode, instance_c, prompt_c, scale, single):
    return qkv.new_empty(qkv.shape), _dtheta_fake(qkv, num_heads, instance_mode, prompt_mode)


def _qkv_setup_context(ctx, inputs, output):
    qkv, num_heads, seq_first, instance_theta, prompt_theta, *scalars = inputs
    out, lse, o_minor = output
    ctx.save_for_backward(qkv, out, lse, o_minor, instance_theta, prompt_theta)
    ctx.layout = (num_heads, seq_first)
    ctx.scalars = tuple(scalars)
    ctx.mark_non_differentiable(lse, o_minor)
    ctx.set_materialize_grads(False)


def _qkv_autograd_backward(ctx, dout, _dlse, _dminor):
    if dout is None:
        return (None,) * (5 + _NUM_SCALAR_ARGS)
    qkv, out, lse, o_minor, instance_theta, prompt_theta = ctx.saved_tensors
    dqkv, dtheta = decoupled_attention_qkv_bwd(dout, qkv, out, lse, o_minor, *ctx.layout, instance_theta,
                                               prompt_theta, *ctx.scalars)
    return (dqkv, None, None, *_theta_grads(dtheta, instance_theta, prompt_theta)) + (None,) * _NUM_SCALAR_ARGS


decoupled_attention_qkv_fwd.register_autograd(_qkv_autograd_backward, setup_context=_qkv_setup_context)


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------

def _split_weight(mix: str, weight) -> Tuple[int, Optional[torch.Tensor], float]:
    """(mode code, theta tensor or None, constant c) of one row type's rule."""
    if mix == "learned":
        return MODE_LEARNED, weight, 0.0
    if mix == "fixed":
        return MODE_FIXED, None, float(weight)
    return MIX_MODES[mix], None, 0.0


def attention_path(*, num_prompts: int, causal: bool, prompt_rows_see_all: bool, instance_mix: str,
                   prompt_mix: str, return_lse: bool = False) -> str:
    """Which implementation a call runs: 'sdpa', 'single' or 'split' (see the module docstring)."""
    exact = instance_mix == "exact" and prompt_mix == "exact"
    reads_ahead = causal and prompt_rows_see_all and num_prompts > 0
    no_prompt_standard = num_prompts == 0 and "learned" not in (instance_mix, prompt_mix)
    if not return_lse and DISPATCH_TO_SDPA and ((exact and not reads_ahead) or no_prompt_standard):
        return "sdpa"
    if exact and not return_lse:
        return "single"
    return "split"


def _plan(q, k, v, *, prompt_start, num_prompts, causal, prompt_rows_see_all, instance_mix, prompt_mix,
          instance_weight, prompt_weight, scale, return_lse=False):
    """Check a call on the [B, H, N, D] views q, k, v and choose its path: None where SDPA runs it,
    else the fused kernels' arguments (theta_x, theta_p, scalars)."""
    check_decoupled_attention_args(
        q, k, v, prompt_start=prompt_start, num_prompts=num_prompts, instance_mix=instance_mix,
        prompt_mix=prompt_mix, instance_weight=instance_weight, prompt_weight=prompt_weight, scale=scale,
    )
    check_triton_runnable(q, interpreted=INTERPRETED, max_head_dim=128)
    path = attention_path(num_prompts=num_prompts, causal=causal, prompt_rows_see_all=prompt_rows_see_all,
                          instance_mix=instance_mix, prompt_mix=prompt_mix, return_lse=return_lse)
    if path == "sdpa":
        return None
    return _scalars(q.shape[3], prompt_start=prompt_start, num_prompts=num_prompts, causal=causal,
                    prompt_rows_see_all=prompt_rows_see_all, instance_mix=instance_mix, prompt_mix=prompt_mix,
                    instance_weight=instance_weight, prompt_weight=prompt_weight, scale=scale, path=path)


def _scalars(head_dim, *, prompt_start, num_prompts, causal, prompt_rows_see_all, instance_mix, prompt_mix,
             instance_weight, prompt_weight, scale, path):
    """The fused kernels' arguments for a checked call on `path`: (theta_x, theta_p, scalars)."""
    mode_x, theta_x, c_x = _split_weight(instance_mix, instance_weight)
    mode_p, theta_p, c_p = _split_weight(prompt_mix, prompt_weight)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    return theta_x, theta_p, (int(prompt_start), int(num_prompts), bool(causal), bool(prompt_rows_see_all), mode_x,
                              mode_p, c_x, c_p, scale, path == "single")


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
    """DPL's four-way decoupled attention, fused Triton kernels (see the module docstring).

    q, k, v: [B, H, N, D] float16 / bfloat16 / float32 (any strides), on a CUDA device or, under
    TRITON_INTERPRET=1, on the CPU; D <= 128. Same semantics as
    `fastprompt.kernels.reference.decoupled_attention`. Returns out [B, H, N, D] in q's dtype (in
    q's memory order: for q a view of a [B, N, 3, H, D] projection, out is a [B, N, H, D] buffer)
    and, with `return_lse=True`, (LSE_P, LSE_X) [B, H, N] float32 (no gradient flows through them).
    Differentiable in q, k, v and in the theta of a `learned` rule.
    """
    plan = _plan(q, k, v, prompt_start=prompt_start, num_prompts=num_prompts, causal=causal,
                 prompt_rows_see_all=prompt_rows_see_all, instance_mix=instance_mix, prompt_mix=prompt_mix,
                 instance_weight=instance_weight, prompt_weight=prompt_weight, scale=scale, return_lse=return_lse)
    if plan is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal), scale=scale)
    theta_x, theta_p, scalars = plan
    out, lse, _ = decoupled_attention_fwd(q, k, v, theta_x, theta_p, *scalars)
    if return_lse:
        return out, lse[0], lse[1]
    return out


def decoupled_attention_qkv(
    qkv: torch.Tensor,
    *,
    num_heads: int,
    seq_first: bool = False,
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
    """Decoupled attention on a packed in-projection, output in the caller's layout, no copy.

    qkv: [B, N, 3E] (seq_first=False, batch-first) or [N, B, 3E] (seq_first=True, the layout of
    OpenAI CLIP's sequence-first nn.MultiheadAttention), [q | k | v] along the last dim with heads
    of E / num_heads features (nn.MultiheadAttention's in_proj order). Returns [B, N, E] or
    [N, B, E]: the input of the out-projection. Its gradient arrives as d qkv in qkv's layout.
    """
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv must be [B, N, 3E] or [N, B, 3E] with E divisible by num_heads={num_heads}; "
                         f"got {getattr(qkv, 'shape', qkv)}")
    q, k, v = _packed_views(qkv, num_heads, seq_first)
    plan = _plan(q, k, v, prompt_start=prompt_start, num_prompts=num_prompts, causal=causal,
                 prompt_rows_see_all=prompt_rows_see_all, instance_mix=instance_mix, prompt_mix=prompt_mix,
                 instance_weight=instance_weight, prompt_weight=prompt_weight, scale=scale)
    if plan is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal), scale=scale)  # [B, H, N, D]
        o = o.permute(2, 0, 1, 3) if seq_first else o.transpose(1, 2)
        return o.flatten(2)  # a view where SDPA's output is head-interleaved (its CUDA kernels)
    theta_x, theta_p, scalars = plan
    out, _, _ = decoupled_attention_qkv_fwd(qkv, int(num_heads), bool(seq_first), theta_x, theta_p, *scalars)
    return out
