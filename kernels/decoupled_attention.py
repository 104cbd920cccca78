"""Fused Triton kernels for DPL's four-way decoupled attention (forward and backward).

Same signature and semantics as `fastprompt.kernels.reference.decoupled_attention` (the spec):
q, k, v [B, H, N, D]; tokens [prompt_start, prompt_start + num_prompts) are prompts P, the rest
instances X; every row keeps two softmax states (over P keys and over X keys) and mixes
out = (1 - w) O_X + w O_P with its row type's rule.

Forward (one program per (batch*head, query tile)): ONE pass over the keys, each key block read
once, in two ranges: the instance sweep over [0, hi) (prompt columns masked out) updates the
instance state, the prompt sweep over [prompt_start, prompt_end) updates the prompt state. Under
causal masking the sweeps stop at the tile's diagonal, except for a tile holding prompt rows that
see every key (`prompt_rows_see_all`). Writes out and LSE_P, LSE_X (natural log, float32).

Backward (FlashAttention-2 style, probabilities recomputed from saved per-row statistics).
Mixing gives out_i = sum_j p_ij v_j with effective probabilities
    p_ij = w_i softmax_P(s_i)_j  (j in P),   p_ij = (1 - w_i) softmax_X(s_i)_j  (j in X),
i.e. p_ij = exp(s_ij - L_i^seg) with L^P = LSE_P - log w and L^X = LSE_X - log(1 - w).
Differentiating O_P, O_X and (for `exact`) w = sigmoid(LSE_P - LSE_X):
    dS_ij = p_ij (dO_i . v_j - Delta_i^seg)
with Delta^P = dO.O_P and Delta^X = dO.O_X when w carries no gradient (`fixed`, `detached`,
`learned`), and Delta^P = Delta^X = dO.out for `exact` (the w term folds in exactly, which makes
it standard attention's backward). `learned`: dL/dw_i = dO_i.(O_P - O_X), and
d theta_h = sum over that row type's rows (of head h, every batch) of dL/dw w (1 - w).
A preprocessing kernel writes (L^P, L^X, Delta^P, Delta^X) per row; for non-exact rules it
recomputes O_P and O_X in float32 (one extra forward sweep), so Delta never divides by w or 1 - w.
dK/dV: one program per key block looping over query tiles; dQ: one program per query tile
looping over key blocks (no atomics, deterministic).

The LSEs returned with `return_lse=True` are analysis outputs: no gradient flows through them.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from .validation import check_decoupled_attention_args, check_triton_runnable, triton_interpreter_enabled

__all__ = ["decoupled_attention", "MIX_MODES", "INTERPRETED"]

# Triton decides at decoration time whether `@triton.jit` kernels run in its CPU interpreter.
INTERPRETED = triton_interpreter_enabled()

# Integer codes of the mixing rules inside the kernels.
MODE_EXACT, MODE_DETACHED, MODE_FIXED, MODE_LEARNED = 0, 1, 2, 3
MIX_MODES = {"exact": MODE_EXACT, "detached": MODE_DETACHED, "fixed": MODE_FIXED, "learned": MODE_LEARNED}

# Test hook: when True, every output buffer starts as NaN, so an element a kernel forgot to write
# fails the comparison instead of passing by luck.
POISON_OUTPUTS = False

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------

def _configs(kind: str):
    """Candidate configs for one kernel kind ('fwd', 'dkdv', 'dq', 'pre').

    Under the interpreter one config with 32-wide tiles: fast, and still several tiles at N=77
    so that the causal skipping across tiles is exercised.
    """
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    if kind == "pre":
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": 64}, num_warps=w, num_stages=2)
                for bm, w in ((64, 4), (128, 8))]
    # 32-row tiles too: at N=77 (text) they pad to 96 rows where 64-row tiles pad to 128.
    shapes = ((128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 2), (128, 128, 8, 2),
              (32, 64, 4, 3), (32, 32, 2, 3))
    if kind == "dkdv":  # key block on the outer side
        shapes = ((64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 4, 2), (128, 128, 8, 2))
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


# Autotuning is keyed on (N, D, dtype: Triton adds the tensor dtypes to the key), plus the flags
# that change the work per tile.
_TUNE_KEY = ["N", "BLOCK_D", "CAUSAL", "SEE_ALL", "MODE_X", "MODE_P"]


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _mix_weights(lse_p, lse_x, table_x, table_p, is_p_row, MODE_X: tl.constexpr, MODE_P: tl.constexpr):
    """(w, 1 - w) per row [BLOCK_M] from the natural-log LSEs and the per-head tables.

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
    else:
        w_x = dyn_w * 0.0 + table_x
        wc_x = 1.0 - w_x
    if MODE_P == 0 or MODE_P == 1:
        w_p = dyn_w
        wc_p = dyn_wc
    else:
        w_p = dyn_w * 0.0 + table_p
        wc_p = 1.0 - w_p
    w = tl.where(is_p_row, w_p, w_x)
    wc = tl.where(is_p_row, wc_p, wc_x)
    only = tl.where(has_p, 1.0, 0.0)
    w = tl.where(both, w, only)
    wc = tl.where(both, wc, 1.0 - only)
    return w, wc


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
def _segment_sweep(q, m_i, l_i, acc, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                   offs_m, is_p_row, lo, hi, D, prompt_start, prompt_end, qk_scale_log2,
                   PROMPT_SEGMENT: tl.constexpr, CAUSAL: tl.constexpr, SEE_ALL: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax of one segment's keys in [lo, hi) (base-2 scores), returns (m, l, acc).

    m is the running max (-inf while no key was seen), l the running sum, acc [BLOCK_M, BLOCK_D]
    the unnormalised output, all float32.
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < hi
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        valid = n_ok[None, :] & (offs_m[:, None] >= 0)
        if not PROMPT_SEGMENT:
            is_p_col = (offs_n >= prompt_start) & (offs_n < prompt_end)
            valid = valid & ~is_p_col[None, :]
        if CAUSAL:
            seen = offs_n[None, :] <= offs_m[:, None]
            if SEE_ALL:
                seen = seen | is_p_row[:, None]
            valid = valid & seen
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key yet keeps m = -inf; subtract 0 instead so nothing is inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _both_segments(q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, is_p_row,
                   tile_start, N, D, prompt_start, prompt_end, qk_scale_log2,
                   CAUSAL: tl.constexpr, SEE_ALL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Both segments' normalised outputs and base-2 LSEs for one query tile.

    Returns (o_p, lse2_p, o_x, lse2_x); o = 0 and lse = -inf for a row with no key in a segment.
    """
    end = _visible_keys_end(tile_start, N, prompt_start, prompt_end, CAUSAL, SEE_ALL, BLOCK_M)
    m_x = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_x = tl.zeros([BLOCK_M], tl.float32)
    acc_x = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_x, l_x, acc_x = _segment_sweep(q, m_x, l_x, acc_x, k_base, v_base, stride_kn, stride_kd, stride_vn,
                                     stride_vd, offs_m, is_p_row, 0, end, D, prompt_start, prompt_end,
                                     qk_scale_log2, False, CAUSAL, SEE_ALL, BLOCK_N, BLOCK_D, DOT_PRECISION)
    m_p = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_p = tl.zeros([BLOCK_M], tl.float32)
    acc_p = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_p, l_p, acc_p = _segment_sweep(q, m_p, l_p, acc_p, k_base, v_base, stride_kn, stride_kd, stride_vn,
                                     stride_vd, offs_m, is_p_row, prompt_start, tl.minimum(prompt_end, end), D,
                                     prompt_start, prompt_end, qk_scale_log2, True, CAUSAL, SEE_ALL, BLOCK_P,
                                     BLOCK_D, DOT_PRECISION)
    has_p = l_p > 0.0
    has_x = l_x > 0.0
    lse2_p = tl.where(has_p, m_p + tl.log2(tl.where(has_p, l_p, 1.0)), float("-inf"))
    lse2_x = tl.where(has_x, m_x + tl.log2(tl.where(has_x, l_x, 1.0)), float("-inf"))
    o_p = acc_p / tl.where(has_p, l_p, 1.0)[:, None]
    o_x = acc_x / tl.where(has_x, l_x, 1.0)[:, None]
    return o_p, lse2_p, o_x, lse2_x


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.autotune(configs=_configs("fwd"), key=_TUNE_KEY)
@triton.jit
def _forward_kernel(
    Q, K, V, Out, LseP, LseX, TableX, TableP,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    H, N, D, prompt_start, prompt_end, qk_scale_log2,
    CAUSAL: tl.constexpr, SEE_ALL: tl.constexpr, MODE_X: tl.constexpr, MODE_P: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (B * H, cdiv(N, BLOCK_M)). Out is contiguous [B, H, N, D]; LseP/LseX [B, H, N] float32."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    tile_start = pid_m * BLOCK_M
    offs_m = tile_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    d_ok = offs_d < D
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    is_p_row = (offs_m >= prompt_start) & (offs_m < prompt_end)

    o_p, lse2_p, o_x, lse2_x = _both_segments(
        q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, is_p_row, tile_start, N, D,
        prompt_start, prompt_end, qk_scale_log2, CAUSAL, SEE_ALL, BLOCK_M, BLOCK_N, BLOCK_P, BLOCK_D,
        DOT_PRECISION)
    lse_p = lse2_p * 0.6931471805599453
    lse_x = lse2_x * 0.6931471805599453
    w, wc = _mix_weights(lse_p, lse_x, tl.load(TableX + h), tl.load(TableP + h), is_p_row, MODE_X, MODE_P)
    out = wc[:, None] * o_x + w[:, None] * o_p

    row = pid_bh.to(tl.int64) * N + offs_m
    tl.store(Out + row[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LseP + row, lse_p, mask=m_ok)
    tl.store(LseX + row, lse_x, mask=m_ok)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

@triton.autotune(configs=_configs("pre"), key=_TUNE_KEY)
@triton.jit
def _backward_preprocess_kernel(
    Q, K, V, Out, DOut, LseP, LseX, TableX, TableP,
    StatP, StatX, DeltaP, DeltaX, DwRow,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, D, prompt_start, prompt_end, qk_scale_log2,
    CAUSAL: tl.constexpr, SEE_ALL: tl.constexpr, MODE_X: tl.constexpr, MODE_P: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per-row statistics of the backward, all [B, H, N] float32.

    StatP/StatX: base-2 effective LSEs (LSE_seg * log2 e - log2 of the segment's share; +inf
    where the share is 0, so p = 0 there). DeltaP/DeltaX as in the module docstring.
    DwRow: w (1 - w) dL/dw for `learned` rows that see both segments, else 0.
    Out and DOut share the strides stride_o*.
    """
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    tile_start = pid_m * BLOCK_M
    offs_m = tile_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    d_ok = offs_d < D
    tile_mask = m_ok[:, None] & d_ok[None, :]
    is_p_row = (offs_m >= prompt_start) & (offs_m < prompt_end)
    o_off = b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_on \
        + offs_d[None, :] * stride_od
    out = tl.load(Out + o_off, mask=tile_mask, other=0.0).to(tl.float32)
    dout = tl.load(DOut + o_off, mask=tile_mask, other=0.0).to(tl.float32)
    delta_out = tl.sum(dout * out, 1)

    row = pid_bh.to(tl.int64) * N + offs_m
    lse_p = tl.load(LseP + row, mask=m_ok, other=float("-inf"))
    lse_x = tl.load(LseX + row, mask=m_ok, other=float("-inf"))
    w, wc = _mix_weights(lse_p, lse_x, tl.load(TableX + h), tl.load(TableP + h), is_p_row, MODE_X, MODE_P)

    if MODE_X == 0 and MODE_P == 0:
        delta_p = delta_out
        delta_x = delta_out
        dw_row = delta_out * 0.0
    else:
        # w carries no gradient for some rows: Delta needs O_P and O_X separately (recomputed in fp32).
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=tile_mask, other=0.0)
        o_p, lse2_p, o_x, lse2_x = _both_segments(
            q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, is_p_row, tile_start, N, D,
            prompt_start, prompt_end, qk_scale_log2, CAUSAL, SEE_ALL, BLOCK_M, BLOCK_N, BLOCK_P, BLOCK_D,
            DOT_PRECISION)
        dp_raw = tl.sum(dout * o_p, 1)
        dx_raw = tl.sum(dout * o_x, 1)
        row_mode = tl.where(is_p_row, MODE_P, MODE_X)
        row_exact = row_mode == 0
        delta_p = tl.where(row_exact, delta_out, dp_raw)
        delta_x = tl.where(row_exact, delta_out, dx_raw)
        both = (lse_p > float("-inf")) & (lse_x > float("-inf"))
        dw_row = tl.where((row_mode == 3) & both, w * wc * (dp_raw - dx_raw), 0.0)

    stat_p = tl.where(w > 0.0, lse_p * 1.4426950408889634 - tl.log2(tl.where(w > 0.0, w, 1.0)), float("inf"))
    stat_x = tl.where(wc > 0.0, lse_x * 1.4426950408889634 - tl.log2(tl.where(wc > 0.0, wc, 1.0)), float("inf"))
    tl.store(StatP + row, stat_p, mask=m_ok)
    tl.store(StatX + row, stat_x, mask=m_ok)
    tl.store(DeltaP + row, delta_p, mask=m_ok)
    tl.store(DeltaX + row, delta_x, mask=m_ok)
    tl.store(DwRow + row, dw_row, mask=m_ok)


@triton.autotune(configs=_configs("dkdv"), key=_TUNE_KEY)
@triton.jit
def _backward_dkdv_kernel(
    Q, K, V, DOut, StatP, StatX, DeltaP, DeltaX, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, D, prompt_start, prompt_end, qk_scale_log2, sm_scale,
    CAUSAL: tl.constexpr, SEE_ALL: tl.constexpr, MODE_X: tl.constexpr, MODE_P: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (B * H, cdiv(N, BLOCK_N)): dK, dV of one key block (contiguous [B, H, N, D] outputs)."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N
    d_ok = offs_d < D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    is_p_col = (offs_n >= prompt_start) & (offs_n < prompt_end)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DOut + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    stat_base = pid_bh.to(tl.int64) * N

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Causal: rows before the key block cannot see it, except prompt rows that see everything;
    # those are swept first, then every row from the block's diagonal tile on.
    first_row = 0
    if CAUSAL:
        first_row = (start_n // BLOCK_M) * BLOCK_M
    lead_lo = prompt_start
    lead_hi = prompt_start
    if CAUSAL and SEE_ALL:
        lead_hi = tl.minimum(prompt_end, first_row)
    for part in tl.static_range(2):
        if part == 0:
            lo = lead_lo
            hi = lead_hi
        else:
            lo = first_row
            hi = N
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < hi
            q_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od, mask=q_mask,
                         other=0.0)
            stat_p = tl.load(StatP + stat_base + offs_m, mask=m_ok, other=float("inf"))
            stat_x = tl.load(StatX + stat_base + offs_m, mask=m_ok, other=float("inf"))
            delta_p = tl.load(DeltaP + stat_base + offs_m, mask=m_ok, other=0.0)
            delta_x = tl.load(DeltaX + stat_base + offs_m, mask=m_ok, other=0.0)
            # Transposed tile [BLOCK_N, BLOCK_M]: keys along rows.
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2
            valid = n_ok[:, None] & m_ok[None, :]
            if CAUSAL:
                seen = offs_n[:, None] <= offs_m[None, :]
                if SEE_ALL:
                    is_p_row = (offs_m >= prompt_start) & (offs_m < prompt_end)
                    seen = seen | is_p_row[None, :]
                valid = valid & seen
            stat = tl.where(is_p_col[:, None], stat_p[None, :], stat_x[None, :])
            p_t = tl.where(valid, tl.exp2(s_t - stat), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            delta = tl.where(is_p_col[:, None], delta_p[None, :], delta_x[None, :])
            ds_t = p_t * (dp_t - delta)
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    row = pid_bh.to(tl.int64) * N + offs_n
    tl.store(DK + row[:, None] * D + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + row[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=_configs("dq"), key=_TUNE_KEY)
@triton.jit
def _backward_dq_kernel(
    Q, K, V, DOut, StatP, StatX, DeltaP, DeltaX, DQ,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, D, prompt_start, prompt_end, qk_scale_log2, sm_scale,
    CAUSAL: tl.constexpr, SEE_ALL: tl.constexpr, MODE_X: tl.constexpr, MODE_P: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (B * H, cdiv(N, BLOCK_M)): dQ of one query tile (contiguous [B, H, N, D] output)."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    tile_start = pid_m * BLOCK_M
    offs_m = tile_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_ok = offs_m < N
    d_ok = offs_d < D
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    do = tl.load(DOut + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_on
                 + offs_d[None, :] * stride_od, mask=q_mask, other=0.0)
    row = pid_bh.to(tl.int64) * N + offs_m
    stat_p = tl.load(StatP + row, mask=m_ok, other=float("inf"))
    stat_x = tl.load(StatX + row, mask=m_ok, other=float("inf"))
    delta_p = tl.load(DeltaP + row, mask=m_ok, other=0.0)
    delta_x = tl.load(DeltaX + row, mask=m_ok, other=0.0)
    is_p_row = (offs_m >= prompt_start) & (offs_m < prompt_end)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = _visible_keys_end(tile_start, N, prompt_start, prompt_end, CAUSAL, SEE_ALL, BLOCK_M)
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < end
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        valid = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            seen = offs_n[None, :] <= offs_m[:, None]
            if SEE_ALL:
                seen = seen | is_p_row[:, None]
            valid = valid & seen
        is_p_col = (offs_n >= prompt_start) & (offs_n < prompt_end)
        stat = tl.where(is_p_col[None, :], stat_p[:, None], stat_x[:, None])
        p = tl.where(valid, tl.exp2(s - stat), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        delta = tl.where(is_p_col[None, :], delta_p[:, None], delta_x[:, None])
        ds = p * (dp - delta)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    tl.store(DQ + row[:, None] * D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _block_p(num_prompts: int) -> int:
    # The prompt sweep's key block: just wide enough for the usual 4..16 prompts.
    return min(64, max(16, triton.next_power_of_2(max(num_prompts, 1))))


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get true float32 products (tf32 would cost ~1e-3 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


def _weight_table(mode: int, theta: Optional[torch.Tensor], c: float, num_heads: int, device) -> torch.Tensor:
    """[H] float32 table of w per head for `fixed` / `learned` (unused for exact/detached)."""
    if mode == MODE_LEARNED:
        return torch.sigmoid(theta.detach().to(device=device, dtype=torch.float32)).contiguous()
    return torch.full((num_heads,), float(c), device=device, dtype=torch.float32)


def _new_output(shape, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def _strides(t: torch.Tensor):
    return tuple(t.stride())


def _forward(q, k, v, instance_theta, prompt_theta, prompt_start, num_prompts, causal, see_all,
             instance_mode, prompt_mode, instance_c, prompt_c, scale):
    b, h, n, d = q.shape
    out = _new_output((b, h, n, d), q, q.dtype)
    lse_p = _new_output((b, h, n), q, torch.float32)
    lse_x = _new_output((b, h, n), q, torch.float32)
    if out.numel() == 0:
        lse_p.fill_(float("-inf"))
        lse_x.fill_(float("-inf"))
        return out, lse_p, lse_x
    table_x = _weight_table(instance_mode, instance_theta, instance_c, h, q.device)
    table_p = _weight_table(prompt_mode, prompt_theta, prompt_c, h, q.device)
    # Batch x heads on grid axis 0 (up to 2^31 - 1 programs; axis 1 stops at 65535).
    grid = lambda meta: (b * h, triton.cdiv(n, meta["BLOCK_M"]))  # noqa: E731
    _forward_kernel[grid](
        q, k, v, out, lse_p, lse_x, table_x, table_p,
        *_strides(q), *_strides(k), *_strides(v),
        h, n, d, prompt_start, prompt_start + num_prompts, scale * _LOG2E,
        CAUSAL=causal, SEE_ALL=see_all and num_prompts > 0, MODE_X=instance_mode, MODE_P=prompt_mode,
        BLOCK_P=_block_p(num_prompts), BLOCK_D=_block_d(d), DOT_PRECISION=_dot_precision(q.dtype),
    )
    return out, lse_p, lse_x


def _backward(dout, q, k, v, out, lse_p, lse_x, instance_theta, prompt_theta, prompt_start, num_prompts,
              causal, see_all, instance_mode, prompt_mode, instance_c, prompt_c, scale):
    b, h, n, d = q.shape
    dq, dk, dv = (_new_output((b, h, n, d), q, q.dtype) for _ in range(3))
    dtheta_x = torch.zeros((h,), device=q.device, dtype=torch.float32)
    dtheta_p = torch.zeros((h,), device=q.device, dtype=torch.float32)
    if dq.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dtheta_x, dtheta_p
    if dout.stride() != out.stride():  # the preprocess kernel reads both with one set of strides
        dout = dout.contiguous()
        out = out.contiguous()
    stats = _new_output((5, b, h, n), q, torch.float32)
    stat_p, stat_x, delta_p, delta_x, dw_row = stats.unbind(0)
    table_x = _weight_table(instance_mode, instance_theta, instance_c, h, q.device)
    table_p = _weight_table(prompt_mode, prompt_theta, prompt_c, h, q.device)
    prompt_end = prompt_start + num_prompts
    see_all = see_all and num_prompts > 0
    common = dict(CAUSAL=causal, SEE_ALL=see_all, MODE_X=instance_mode, MODE_P=prompt_mode,
                  BLOCK_D=_block_d(d), DOT_PRECISION=_dot_precision(q.dtype))
    # detached behaves like exact in the forward but, like fixed, needs the split Delta terms.
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))

    grid_m = lambda meta: (b * h, triton.cdiv(n, meta["BLOCK_M"]))  # noqa: E731
    _backward_preprocess_kernel[grid_m](
        q, k, v, out, dout, lse_p, lse_x, table_x, table_p,
        stat_p, stat_x, delta_p, delta_x, dw_row,
        *strides, h, n, d, prompt_start, prompt_end, scale * _LOG2E,
        BLOCK_P=_block_p(num_prompts), **common,
    )
    grid_n = lambda meta: (b * h, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _backward_dkdv_kernel[grid_n](
        q, k, v, dout, stat_p, stat_x, delta_p, delta_x, dk, dv,
        *strides, h, n, d, prompt_start, prompt_end, scale * _LOG2E, scale, **common,
    )
    _backward_dq_kernel[grid_m](
        q, k, v, dout, stat_p, stat_x, delta_p, delta_x, dq,
        *strides, h, n, d, prompt_start, prompt_end, scale * _LOG2E, scale, **common,
    )
    if MODE_LEARNED in (instance_mode, prompt_mode):
        is_prompt_row = torch.zeros(n, device=q.device, dtype=torch.bool)
        is_prompt_row[prompt_start:prompt_end] = True
        per_head_x = dw_row.masked_fill(is_prompt_row, 0.0).sum(dim=(0, 2))
        per_head_p = dw_row.masked_fill(~is_prompt_row, 0.0).sum(dim=(0, 2))
        if instance_mode == MODE_LEARNED:
            dtheta_x = per_head_x
        if prompt_mode == MODE_LEARNED:
            dtheta_p = per_head_p
    return dq, dk, dv, dtheta_x, dtheta_p


# ----------------------------------------------------------------------------------------------
# Torch custom ops (eager, autograd and torch.compile)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("fastprompt::decoupled_attention_fwd", mutates_args=())
def decoupled_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    instance_theta: Optional[torch.Tensor], prompt_theta: Optional[torch.Tensor],
    prompt_start: int, num_prompts: int, causal: bool, prompt_rows_see_all: bool,
    instance_mode: int, prompt_mode: int, instance_c: float, prompt_c: float, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, H, N, D] in q's dtype, LSE_P [B, H, N] float32, LSE_X [B, H, N] float32)."""
    return _forward(q, k, v, instance_theta, prompt_theta, prompt_start, num_prompts, causal,
                    prompt_rows_see_all, instance_mode, prompt_mode, instance_c, prompt_c, scale)


@decoupled_attention_fwd.register_fake
def _(q, k, v, instance_theta, prompt_theta, prompt_start, num_prompts, causal, prompt_rows_see_all,
      instance_mode, prompt_mode, instance_c, prompt_c, scale):
    b, h, n, _ = q.shape
    out = q.new_empty(q.shape)  # a new contiguous tensor, like the kernel's
    return out, q.new_empty((b, h, n), dtype=torch.float32), q.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op("fastprompt::decoupled_attention_bwd", mutates_args=())
def decoupled_attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse_p: torch.Tensor, lse_x: torch.Tensor,
    instance_theta: Optional[torch.Tensor], prompt_theta: Optional[torch.Tensor],
    prompt_start: int, num_prompts: int, causal: bool, prompt_rows_see_all: bool,
    instance_mode: int, prompt_mode: int, instance_c: float, prompt_c: float, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV in q's dtype, d theta_instance [H], d theta_prompt [H] float32; zeros if unused)."""
    return _backward(dout, q, k, v, out, lse_p, lse_x, instance_theta, prompt_theta, prompt_start,
                     num_prompts, causal, prompt_rows_see_all, instance_mode, prompt_mode, instance_c,
                     prompt_c, scale)


@decoupled_attention_bwd.register_fake
def _(dout, q, k, v, out, lse_p, lse_x, instance_theta, prompt_theta, prompt_start, num_prompts, causal,
      prompt_rows_see_all, instance_mode, prompt_mode, instance_c, prompt_c, scale):
    h = q.shape[1]
    grads = [q.new_empty(q.shape) for _ in range(3)]
    return (*grads, q.new_empty((h,), dtype=torch.float32), q.new_empty((h,), dtype=torch.float32))


_NUM_SCALAR_ARGS = 9  # prompt_start .. scale


def _setup_context(ctx, inputs, output):
    q, k, v, instance_theta, prompt_theta, *scalars = inputs
    out, lse_p, lse_x = output
    ctx.save_for_backward(q, k, v, out, lse_p, lse_x, instance_theta, prompt_theta)
    ctx.scalars = tuple(scalars)
    ctx.mark_non_differentiable(lse_p, lse_x)


def _autograd_backward(ctx, dout, _dlse_p, _dlse_x):
    q, k, v, out, lse_p, lse_x, instance_theta, prompt_theta = ctx.saved_tensors
    dq, dk, dv, dtheta_x, dtheta_p = decoupled_attention_bwd(
        dout, q, k, v, out, lse_p, lse_x, instance_theta, prompt_theta, *ctx.scalars)
    dtheta_x = dtheta_x.to(instance_theta.dtype) if instance_theta is not None else None
    dtheta_p = dtheta_p.to(prompt_theta.dtype) if prompt_theta is not None else None
    return (dq, dk, dv, dtheta_x, dtheta_p) + (None,) * _NUM_SCALAR_ARGS


decoupled_attention_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------

def _split_weight(mix: str, weight) -> Tuple[int, Optional[torch.Tensor], float]:
    """(mode code, theta tensor or None, constant c) of one row type's rule."""
    if mix == "learned":
        return MODE_LEARNED, weight, 0.0
    if mix == "fixed":
        return MODE_FIXED, None, float(weight)
    return MIX_MODES[mix], None, 0.0


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
    `fastprompt.kernels.reference.decoupled_attention`. Returns out [B, H, N, D] in q's dtype and,
    with `return_lse=True`, (LSE_P, LSE_X) [B, H, N] float32 (no gradient flows through them).
    Differentiable in q, k, v and in the theta of a `learned` rule.
    """
    check_decoupled_attention_args(
        q, k, v, prompt_start=prompt_start, num_prompts=num_prompts, instance_mix=instance_mix,
        prompt_mix=prompt_mix, instance_weight=instance_weight, prompt_weight=prompt_weight, scale=scale,
    )
    check_triton_runnable(q, interpreted=INTERPRETED, max_head_dim=128)
    d = q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    mode_x, theta_x, c_x = _split_weight(instance_mix, instance_weight)
    mode_p, theta_p, c_p = _split_weight(prompt_mix, prompt_weight)
    out, lse_p, lse_x = decoupled_attention_fwd(
        q, k, v, theta_x, theta_p, int(prompt_start), int(num_prompts), bool(causal), bool(prompt_rows_see_all),
        mode_x, mode_p, c_x, c_p, scale,
    )
    if return_lse:
        return out, lse_p, lse_x
    return out

