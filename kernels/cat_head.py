"""DePT's CAT head + ITM fusion + cross-entropy as fused Triton kernels (forward and backward).

Same maths and signatures as `fastprompt.kernels.reference.cat_head_loss` / `cat_head_logits`.
Shapes: B rows (images), C classes, d features.

Forward, 2 launches (`_loss_fwd_kernel`: one program per block of rows and slice of classes,
online logsumexp over the slice's C tiles; `_lse_merge_kernel`: one program that merges the
slices in order, writes the per-row log-sum-exps and the loss, and checks the labels):
    g_I = gamma_I f_I + beta_I,  g_T = gamma_T f_T[y] + beta_T      (text row gathered by label)
    z_img = g_I W^T + b,  z_txt = g_T W^T + b,  z_itm = s cos(f_I, f_T)
    loss = (1 - lam)/B sum CE(z_itm) + lam/(2B) sum [CE(z_img) + CE(z_txt)]
Neither g nor any logit reaches global memory; it writes the three per-row log-sum-exps and the
inverse feature norms, which is all the backward needs.

Backward, 3 launches (no float atomics, so bit-for-bit deterministic):
  1. `_logit_grad_kernel`  (row blocks x class blocks): recompute the logits of a tile, write
     n = softmax - onehot for the three heads [3, B, ldc] (dot dtype) and n_itm * z_itm [B, ldc]
     fp32, ldc = C rounded up to 16 (aligned rows: vector loads).
  2. `_row_grad_kernel`    (row blocks x feature blocks, loop over C): dg = dz W and the ITM
     gradient -> d f_I (and d f_T for per-image text); per-row-block partial sums of
     dgamma/dbeta (summed in order by kernel 3).
  3. `_class_grad_kernel`  (class blocks x feature blocks x row splits, loop over the split's rows):
     dW = dz^T g, db, and for shared text [C, d] d f_T (ITM part plus the CAT rows scattered back
     to their label through a one-hot product). With several row splits each program writes an
     fp32 partial; the last program of a tile to finish (an integer ticket, zeroed by kernel 1)
     sums the partials in split order and writes the gradient: deterministic, no extra launch.

Tiles: 64 rows from B >= 64 (wgmma on Hopper), classes as the M side of the class kernel.
Dot products accumulate in fp32; their operands take the features' dtype: exact fp32 ("ieee")
dots for fp32, native fp16/bf16 dots otherwise (bf16 under the interpreter computes in fp32: its
bf16 dot is wrong). Transforms, norms, softmax and every epilogue run in fp32. The stored logit
gradients are softmax - onehot, in [-1, 1] whatever B is (fp16-safe); the head weights
(1-lam)/B, lam/(2B) and the upstream gradient are applied in the reduction epilogues.

Value checks without a host sync: a label outside [0, C) never indexes memory (the gather is
masked), makes the loss NaN and, on a GPU, fails a device-side assertion in the merge kernel
(like PyTorch's cross_entropy; so does a tensor logit_scale <= 0). Non-finite features give a
non-finite loss. `CHECK_VALUES = True` adds the reference's host-side checks (one sync per call,
ValueErrors that name the problem): a debugging switch, off on the training hot path.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .validation import (check_cat_head_args, check_cat_head_values, check_triton_device, device_arch,
                         triton_interpreter_enabled)

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

__all__ = ["cat_head_loss", "cat_head_logits"]

# F.normalize divides by max(|x|, eps): below eps the gradient is a plain 1/eps scaling.
# (A constexpr: compiled Triton kernels may read only constexpr globals.)
NORM_EPS = tl.constexpr(1e-12) if HAS_TRITON else 1e-12
_FALLBACK = 'head_backend="reference" (fastprompt.kernels.reference.cat_head_loss / cat_head_logits)'

# The reference's host-side value checks (labels in [0, C), finite features, tensor logit_scale > 0)
# with their ValueErrors cost a host sync per call: off by default (the kernels check labels and the
# scale on the device, see the module docstring); True while debugging. Shape/dtype/device checks
# always run.
CHECK_VALUES = False

# Tests set this to a BlockSizes to force small tiles (several C tiles, several row splits) on
# small problems; None picks sizes from the problem and the device.
FORCE_BLOCKS = None


class BlockSizes:
    """Tile sizes, warps and pipeline stages shared by the five kernels (every dot dimension >= 16)."""

    def __init__(self, rows: int, classes: int, features: int, splits: Optional[int] = None, num_warps: int = 4,
                 num_stages: int = 2, class_splits: Optional[int] = None):
        self.rows, self.classes, self.features = rows, classes, features
        # splits: row slices of the backward's class-side reduction; class_splits: class slices
        # of the forward. None: chosen from the problem and the GPU.
        self.splits, self.class_splits = splits, class_splits
        self.num_warps, self.num_stages = num_warps, num_stages

    def __repr__(self) -> str:
        return (f"BlockSizes(rows={self.rows}, classes={self.classes}, features={self.features}, "
                f"splits={self.splits}, class_splits={self.class_splits})")


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _pick_blocks(b: int, c: int, d: int, per_row_text: bool, dtype: torch.dtype, arch: int = 90) -> BlockSizes:
    if FORCE_BLOCKS is not None:
        return FORCE_BLOCKS
    if triton_interpreter_enabled():
        # The interpreter pays per operation, not per element: few large tiles run fastest.
        if per_row_text:
            return BlockSizes(_pow2_clamp(b, 16, 32), _pow2_clamp(c, 16, 64), _pow2_clamp(d, 16, 64),
                              splits=1, class_splits=1)
        return BlockSizes(_pow2_clamp(b, 16, 64), _pow2_clamp(c, 16, 128), _pow2_clamp(d, 16, 128),
                          splits=1, class_splits=1)
    # GPU: tiles with no register spill in any of the six kernels, per architecture
    # (tests/kernels/test_static_budget.py holds this; benchmarks/results/static_budget.md lists them).
    # From B = 64 rows the row-side tiles are 64 rows tall, so Hopper's wgmma (M = 64 per
    # warpgroup) runs them; the class kernel's M side is the classes. Ampere's mma.sync keeps more
    # of a tile in registers: 32 classes x 32 features per tile there. The 3-D per-row text tile
    # [rows, classes, features] is the heaviest; fp32 operands ("ieee" dots) cost the most registers.
    if per_row_text:
        return BlockSizes(16, 16, 16, num_warps=8)
    if dtype == torch.float32:
        return BlockSizes(16, 32, 32, num_warps=8)
    if b < 64:
        return BlockSizes(16, 64, 64, num_warps=8)
    if arch >= 90:
        return BlockSizes(64, 64, 64, num_warps=8)
    return BlockSizes(64, 32, 32, num_warps=8)


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of the device (the static budget tool substitutes a Hopper's 132)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _class_splits(blocks: BlockSizes, row_blocks: int, c: int, device: torch.device) -> int:
    """How many slices of the classes the forward's rows are split into (merged by log-sum-exp)."""
    class_tiles = triton.cdiv(c, blocks.classes)
    if blocks.class_splits is not None:
        return max(1, min(blocks.class_splits, class_tiles))
    # Fill the chip twice over: at small B the rows alone give a handful of programs.
    return max(1, min(class_tiles, triton.cdiv(2 * _sm_count(device), row_blocks)))


def _row_splits(blocks: BlockSizes, b: int, c: int, d: int, device: torch.device) -> int:
    """How many slices of rows the class-side reduction is split into (split-K)."""
    row_blocks = triton.cdiv(b, blocks.rows)
    if blocks.splits is not None:
        return max(1, min(blocks.splits, row_blocks))
    tiles = triton.cdiv(c, blocks.classes) * triton.cdiv(d, blocks.features)
    # Enough programs to fill the chip twice over, but never a slice thinner than 4 row blocks.
    return max(1, min(triton.cdiv(2 * _sm_count(device), tiles), row_blocks // 4))


def _padded(c: int) -> int:
    """Leading dimension of the [B, C] logit-gradient buffers: rows start 16-element aligned."""
    return triton.cdiv(c, 16) * 16


if HAS_TRITON:

    @triton.jit
    def _load_scale(scale_ptr, scale_value, SCALE_FROM_PTR: tl.constexpr):
        if SCALE_FROM_PTR:
            s = tl.load(scale_ptr).to(tl.float32)
        else:
            s = scale_value
        return s

    @triton.jit
    def _labels(labels_ptr, rows, rows64, row_ok, C, D, PER_ROW_TEXT: tl.constexpr):
        """(labels, label in [0, C), offset of each row's true text feature). A bad label reads row 0
        (its gather is masked off by the callers)."""
        y = tl.load(labels_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        label_ok = (y >= 0) & (y < C)
        y_safe = tl.where(label_ok, y, 0)
        if PER_ROW_TEXT:
            true_txt_row = (rows64 * C + y_safe) * D
        else:
            true_txt_row = y_safe * D
        return y, label_ok, true_txt_row

    @triton.jit
    def _head_logit_tiles(
        img_ptr, txt_ptr, true_txt_row, gather_ok, gamma_i_ptr, beta_i_ptr, gamma_t_ptr, beta_t_ptr, w_ptr,
        rows64, row_ok, cols64, col_ok, C, D,
        PER_ROW_TEXT: tl.constexpr, ITM: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One [BLOCK_B, BLOCK_C] tile of the three heads, summed over d in BLOCK_D slices.

        Returns (g_I W^T, g_T[y] W^T, f_I . f_T unnormalised, sum of f_T^2 per class or per
        (row, class)); bias, norms and scale are applied by the caller. Without ITM (lam = 1:
        the CAT head alone) the last two stay zero and cost nothing."""
        acc_img = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        acc_txt = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        raw_itm = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        if PER_ROW_TEXT:
            ssq_t = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        else:
            ssq_t = tl.zeros([BLOCK_C], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            k_ok = ks < D
            rk_mask = row_ok[:, None] & k_ok[None, :]
            f_i = tl.load(img_ptr + rows64[:, None] * D + ks[None, :], mask=rk_mask, other=0.0)
            f_tt = tl.load(txt_ptr + true_txt_row[:, None] + ks[None, :], mask=gather_ok[:, None] & k_ok[None, :],
                           other=0.0).to(tl.float32)
            gamma_i = tl.load(gamma_i_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            beta_i = tl.load(beta_i_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            gamma_t = tl.load(gamma_t_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            beta_t = tl.load(beta_t_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            # The transform in fp32, rounded once to the dot's operand type.
            g_i = (f_i.to(tl.float32) * gamma_i[None, :] + beta_i[None, :]).to(DOT)
            g_t = (f_tt * gamma_t[None, :] + beta_t[None, :]).to(DOT)
            w = tl.load(w_ptr + cols64[:, None] * D + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            w_t = tl.trans(w.to(DOT))
            acc_img += tl.dot(g_i, w_t, input_precision=PRECISION)
            acc_txt += tl.dot(g_t, w_t, input_precision=PRECISION)
            if not ITM:
                pass
            elif PER_ROW_TEXT:
                # Each row has its own C x d text matrix: a batched mat-vec, not a matmul.
                f_t = tl.load(
                    txt_ptr + (rows64[:, None, None] * C + cols64[None, :, None]) * D + ks[None, None, :],
                    mask=row_ok[:, None, None] & col_ok[None, :, None] & k_ok[None, None, :], other=0.0,
                ).to(tl.float32)
                raw_itm += tl.sum(f_i.to(tl.float32)[:, None, :] * f_t, axis=2)
                ssq_t += tl.sum(f_t * f_t, axis=2)
            else:
                f_t = tl.load(txt_ptr + cols64[:, None] * D + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                raw_itm += tl.dot(f_i.to(DOT), tl.trans(f_t.to(DOT)), input_precision=PRECISION)
                f_t32 = f_t.to(tl.float32)
                ssq_t += tl.sum(f_t32 * f_t32, axis=1)
        return acc_img, acc_txt, raw_itm, ssq_t

    @triton.jit
    def _loss_fwd_kernel(
        img_ptr, txt_ptr, labels_ptr, gamma_i_ptr, beta_i_ptr, gamma_t_ptr, beta_t_ptr, w_ptr, bias_ptr,
        scale_ptr, scale_value, stats_ptr, inv_norm_img_ptr, inv_norm_txt_ptr,
        B, C, D, cols_per_split,
        PER_ROW_TEXT: tl.constexpr, ITM: tl.constexpr, SCALE_FROM_PTR: tl.constexpr, DOT: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program: BLOCK_B rows against one slice of the classes (cols_per_split, a multiple of
        BLOCK_C). Writes the slice's log-sum-exp statistics stats [3 heads, 3, splits, B]
        (running max, sum of exp below it, target logit or 0), merged by `_lse_merge_kernel`;
        inv_norm_img [B] (first slice) and inv_norm_txt ([C] from the first row block, or [B, C])."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        c_begin = split * cols_per_split
        c_end = tl.minimum(c_begin + cols_per_split, C)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        rows64 = rows.to(tl.int64)
        y, label_ok, true_txt_row = _labels(labels_ptr, rows, rows64, row_ok, C, D, PER_ROW_TEXT)
        s = _load_scale(scale_ptr, scale_value, SCALE_FROM_PTR)

        # Image norms first: every C tile needs them (the ITM head only).
        ssq_i = tl.zeros([BLOCK_B], dtype=tl.float32)
        for k0 in range(0, D if ITM else 0, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            f_i = tl.load(img_ptr + rows64[:, None] * D + ks[None, :], mask=row_ok[:, None] & (ks < D)[None, :], other=0.0).to(tl.float32)
            ssq_i += tl.sum(f_i * f_i, axis=1)
        inv_ni = 1.0 / tl.maximum(tl.sqrt(ssq_i), NORM_EPS)

        neg_inf = float("-inf")
        m_itm = tl.full([BLOCK_B], neg_inf, tl.float32)
        m_img = tl.full([BLOCK_B], neg_inf, tl.float32)
        m_txt = tl.full([BLOCK_B], neg_inf, tl.float32)
        l_itm = tl.zeros([BLOCK_B], dtype=tl.float32)
        l_img = tl.zeros([BLOCK_B], dtype=tl.float32)
        l_txt = tl.zeros([BLOCK_B], dtype=tl.float32)
        t_itm = tl.zeros([BLOCK_B], dtype=tl.float32)
        t_img = tl.zeros([BLOCK_B], dtype=tl.float32)
        t_txt = tl.zeros([BLOCK_B], dtype=tl.float32)
        for c0 in range(c_begin, c_end, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < c_end
            cols64 = cols.to(tl.int64)
            acc_img, acc_txt, raw_itm, ssq_t = _head_logit_tiles(
                img_ptr, txt_ptr, true_txt_row, row_ok & label_ok, gamma_i_ptr, beta_i_ptr, gamma_t_ptr, beta_t_ptr,
                w_ptr, rows64, row_ok, cols64, col_ok, C, D, PER_ROW_TEXT, ITM, DOT, PRECISION, BLOCK_B, BLOCK_C,
                BLOCK_D,
            )
            inv_nt = 1.0 / tl.maximum(tl.sqrt(ssq_t), NORM_EPS)
            if not ITM:
                z_itm = raw_itm  # zeros: a constant head, weighted 0
            elif PER_ROW_TEXT:
                z_itm = s * raw_itm * inv_ni[:, None] * inv_nt
                tl.store(inv_norm_txt_ptr + rows64[:, None] * C + cols64[None, :], inv_nt, mask=row_ok[:, None] & col_ok[None, :])
            else:
                z_itm = s * raw_itm * inv_ni[:, None] * inv_nt[None, :]
                # Every program computes the same class norms; one of them keeps them.
                tl.store(inv_norm_txt_ptr + cols64, inv_nt, mask=col_ok & (pid == 0))
            bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            valid = col_ok[None, :]
            is_target = cols64[None, :] == y[:, None]
            z_itm = tl.where(valid, z_itm, neg_inf)
            z_img = tl.where(valid, acc_img + bias[None, :], neg_inf)
            z_txt = tl.where(valid, acc_txt + bias[None, :], neg_inf)
            t_itm += tl.sum(tl.where(is_target, z_itm, 0.0), axis=1)
            t_img += tl.sum(tl.where(is_target, z_img, 0.0), axis=1)
            t_txt += tl.sum(tl.where(is_target, z_txt, 0.0), axis=1)
            # Online logsumexp: rescale the running sum to the new running max.
            new_m = tl.maximum(m_itm, tl.max(z_itm, axis=1))
            l_itm = l_itm * tl.exp(m_itm - new_m) + tl.sum(tl.exp(z_itm - new_m[:, None]), axis=1)
            m_itm = new_m
            new_m = tl.maximum(m_img, tl.max(z_img, axis=1))
            l_img = l_img * tl.exp(m_img - new_m) + tl.sum(tl.exp(z_img - new_m[:, None]), axis=1)
            m_img = new_m
            new_m = tl.maximum(m_txt, tl.max(z_txt, axis=1))
            l_txt = l_txt * tl.exp(m_txt - new_m) + tl.sum(tl.exp(z_txt - new_m[:, None]), axis=1)
            m_txt = new_m
        # A label outside [0, C) matches no column: its loss is made NaN (and the merge kernel asserts).
        bad = float("nan")
        t_itm = tl.where(label_ok, t_itm, bad)
        t_img = tl.where(label_ok, t_img, bad)
        t_txt = tl.where(label_ok, t_txt, bad)
        stat = n_splits * B  # one (head, statistic) plane
        base = split * B + rows
        tl.store(stats_ptr + base, m_itm, mask=row_ok)
        tl.store(stats_ptr + stat + base, l_itm, mask=row_ok)
        tl.store(stats_ptr + 2 * stat + base, t_itm, mask=row_ok)
        tl.store(stats_ptr + 3 * stat + base, m_img, mask=row_ok)
        tl.store(stats_ptr + 4 * stat + base, l_img, mask=row_ok)
        tl.store(stats_ptr + 5 * stat + base, t_img, mask=row_ok)
        tl.store(stats_ptr + 6 * stat + base, m_txt, mask=row_ok)
        tl.store(stats_ptr + 7 * stat + base, l_txt, mask=row_ok)
        tl.store(stats_ptr + 8 * stat + base, t_txt, mask=row_ok)
        tl.store(inv_norm_img_ptr + rows, inv_ni, mask=row_ok & (split == 0))

    @triton.jit
    def _merge_head(stats_ptr, head: tl.constexpr, rows, row_ok, B, n_splits, BLOCK_B: tl.constexpr):
        """(log-sum-exp, target logit) of one head from its per-slice statistics, in slice order."""
        stat = n_splits * B
        m = tl.full([BLOCK_B], float("-inf"), tl.float32)
        for j in range(0, n_splits):
            m = tl.maximum(m, tl.load(stats_ptr + (3 * head) * stat + j * B + rows, mask=row_ok, other=0.0))
        total = tl.zeros([BLOCK_B], dtype=tl.float32)
        target = tl.zeros([BLOCK_B], dtype=tl.float32)
        for j in range(0, n_splits):
            m_j = tl.load(stats_ptr + (3 * head) * stat + j * B + rows, mask=row_ok, other=0.0)
            # Rows past B read a sum of 1: their (unstored) log stays finite.
            l_j = tl.load(stats_ptr + (3 * head + 1) * stat + j * B + rows, mask=row_ok, other=1.0)
            total += l_j * tl.exp(m_j - m)
            target += tl.load(stats_ptr + (3 * head + 2) * stat + j * B + rows, mask=row_ok, other=0.0)
        return m + tl.log(total), target

    @triton.jit(debug=True)  # debug: its device-side assertions are compiled in (this kernel only)
    def _lse_merge_kernel(stats_ptr, labels_ptr, scale_ptr, scale_value, loss_ptr, lse_ptr, B, C, n_splits,
                          coef_itm, coef_cat, SCALE_FROM_PTR: tl.constexpr, BLOCK_B: tl.constexpr):
        """One program: the three log-sum-exps lse [3, B] per row and the loss (a scalar, rows summed
        in a fixed order). Asserts on the device that every label lies in [0, C) and the scale is
        positive: no host sync, and a bad label has already made its row's loss NaN."""
        s = _load_scale(scale_ptr, scale_value, SCALE_FROM_PTR)
        tl.device_assert(s > 0, "cat_head_loss: logit_scale must be positive (s = exp(CLIP's logit_scale))")
        acc = tl.zeros([BLOCK_B], dtype=tl.float32)
        for r0 in range(0, B, BLOCK_B):
            rows = r0 + tl.arange(0, BLOCK_B)
            row_ok = rows < B
            y = tl.load(labels_ptr + rows, mask=row_ok, other=0).to(tl.int64)
            tl.device_assert((y >= 0) & (y < C), "cat_head_loss: labels must lie in [0, C)")
            lse_itm, t_itm = _merge_head(stats_ptr, 0, rows, row_ok, B, n_splits, BLOCK_B)
            lse_img, t_img = _merge_head(stats_ptr, 1, rows, row_ok, B, n_splits, BLOCK_B)
            lse_txt, t_txt = _merge_head(stats_ptr, 2, rows, row_ok, B, n_splits, BLOCK_B)
            loss_row = coef_itm * (lse_itm - t_itm) + coef_cat * ((lse_img - t_img) + (lse_txt - t_txt))
            acc += tl.where(row_ok, loss_row, 0.0)
            tl.store(lse_ptr + rows, lse_itm, mask=row_ok)
            tl.store(lse_ptr + B + rows, lse_img, mask=row_ok)
            tl.store(lse_ptr + 2 * B + rows, lse_txt, mask=row_ok)
        # A non-positive scale also shows in the loss (NaN), where device assertions are compiled out.
        tl.store(loss_ptr, tl.where(s > 0, tl.sum(acc, axis=0), float("nan")))

    @triton.jit
    def _logit_grad_kernel(
        img_ptr, txt_ptr, labels_ptr, gamma_i_ptr, beta_i_ptr, gamma_t_ptr, beta_t_ptr, w_ptr, bias_ptr,
        scale_ptr, scale_value, lse_ptr, inv_norm_img_ptr, inv_norm_txt_ptr, n_ptr, nz_ptr, ticket_ptr, n_tickets,
        B, C, D, LDC,
        PER_ROW_TEXT: tl.constexpr, ITM: tl.constexpr, SCALE_FROM_PTR: tl.constexpr, DOT: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """The logit gradients without their weights: n [3, B, LDC] = softmax - onehot for the itm,
        cat image and cat text heads (in the dot dtype: values in [-1, 1] suit fp16/bf16), and
        nz [B, LDC] fp32 = n_itm * z_itm; 0 in the padding columns [C, LDC), so readers load whole
        aligned rows. The weights (1-lam)/B, lam/(2B) and the upstream gradient are applied by the
        reduction kernels' epilogues. Program (0, 0) also zeroes the class kernel's tickets."""
        pid_b = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        rows64 = rows.to(tl.int64)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        cols64 = cols.to(tl.int64)
        y, label_ok, true_txt_row = _labels(labels_ptr, rows, rows64, row_ok, C, D, PER_ROW_TEXT)
        s = _load_scale(scale_ptr, scale_value, SCALE_FROM_PTR)
        if (pid_b == 0) & (pid_c == 0):
            for t0 in range(0, n_tickets, 128):
                tickets = t0 + tl.arange(0, 128)
                tl.store(ticket_ptr + tickets, tl.zeros([128], dtype=tl.int32), mask=tickets < n_tickets)
        acc_img, acc_txt, raw_itm, _ = _head_logit_tiles(
            img_ptr, txt_ptr, true_txt_row, row_ok & label_ok, gamma_i_ptr, beta_i_ptr, gamma_t_ptr, beta_t_ptr,
            w_ptr, rows64, row_ok, cols64, col_ok, C, D, PER_ROW_TEXT, ITM, DOT, PRECISION, BLOCK_B, BLOCK_C, BLOCK_D,
        )
        inv_ni = tl.load(inv_norm_img_ptr + rows, mask=row_ok & ITM, other=0.0)
        tile_mask = row_ok[:, None] & col_ok[None, :]
        if PER_ROW_TEXT:
            inv_nt = tl.load(inv_norm_txt_ptr + rows64[:, None] * C + cols64[None, :], mask=tile_mask & ITM, other=0.0)
        else:
            inv_nt = tl.load(inv_norm_txt_ptr + cols64, mask=col_ok & ITM, other=0.0)[None, :]
        z_itm = s * raw_itm * inv_ni[:, None] * inv_nt
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        lse_itm = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        lse_img = tl.load(lse_ptr + B + rows, mask=row_ok, other=0.0)
        lse_txt = tl.load(lse_ptr + 2 * B + rows, mask=row_ok, other=0.0)
        onehot = tl.where(cols64[None, :] == y[:, None], 1.0, 0.0)
        n_itm = tl.exp(z_itm - lse_itm[:, None]) - onehot
        n_img = tl.exp(acc_img + bias[None, :] - lse_img[:, None]) - onehot
        n_txt = tl.exp(acc_txt + bias[None, :] - lse_txt[:, None]) - onehot
        offs = rows64[:, None] * LDC + cols64[None, :]
        plane = B * LDC
        keep = row_ok[:, None] & (cols < LDC)[None, :]  # padding columns too, as zeros
        valid = col_ok[None, :]
        tl.store(n_ptr + plane + offs, tl.where(valid, n_img, 0.0).to(n_ptr.dtype.element_ty), mask=keep)
        tl.store(n_ptr + 2 * plane + offs, tl.where(valid, n_txt, 0.0).to(n_ptr.dtype.element_ty), mask=keep)
        if ITM:  # without it the readers skip n_itm and nz
            tl.store(n_ptr + offs, tl.where(valid, n_itm, 0.0).to(n_ptr.dtype.element_ty), mask=keep)
            tl.store(nz_ptr + offs, tl.where(valid, n_itm * z_itm, 0.0), mask=keep)

    @triton.jit
    def _row_grad_kernel(
        img_ptr, txt_ptr, labels_ptr, gamma_i_ptr, gamma_t_ptr, w_ptr,
        scale_ptr, scale_value, grad_loss_ptr, coef_itm, coef_cat,
        inv_norm_img_ptr, inv_norm_txt_ptr, n_ptr, nz_ptr,
        d_img_ptr, d_txt_ptr, dg_txt_ptr, part_ptr,
        B, C, D, LDC,
        PER_ROW_TEXT: tl.constexpr, ITM: tl.constexpr, SCALE_FROM_PTR: tl.constexpr, DOT: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Reductions over classes for a block of rows and a slice of features.

        d f_I = gamma_I (dz_img W) + ITM part; dg_txt [B, D] fp32 = gamma_T (n_txt W), the CAT
        gradient of each text row before its weight, for the class kernel to scatter to labels;
        partial sums part [4, row blocks, D] = dgamma_I, dbeta_I, dgamma_T, dbeta_T. For per-row
        text also d f_T [B, C, D] in full (ITM part everywhere, plus the CAT part at column y).
        """
        pid_b = tl.program_id(0)
        pid_d = tl.program_id(1)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        rows64 = rows.to(tl.int64)
        ks = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        k_ok = ks < D
        rk_mask = row_ok[:, None] & k_ok[None, :]
        y, label_ok, true_txt_row = _labels(labels_ptr, rows, rows64, row_ok, C, D, PER_ROW_TEXT)
        s = _load_scale(scale_ptr, scale_value, SCALE_FROM_PTR)
        g = tl.load(grad_loss_ptr).to(tl.float32)
        a_itm = g * coef_itm
        a_cat = g * coef_cat
        f_i = tl.load(img_ptr + rows64[:, None] * D + ks[None, :], mask=rk_mask, other=0.0).to(tl.float32)
        inv_ni = tl.load(inv_norm_img_ptr + rows, mask=row_ok, other=0.0)
        u = f_i * inv_ni[:, None]
        plane = B * LDC
        acc_gi = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        acc_gt = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        nz_rowsum = tl.zeros([BLOCK_B], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < C
            cols64 = cols.to(tl.int64)
            tile_mask = row_ok[:, None] & col_ok[None, :]
            # n, nz: whole aligned rows up to LDC (the padding holds zeros).
            offs_n = rows64[:, None] * LDC + cols64[None, :]
            n_mask = row_ok[:, None] & (cols < LDC)[None, :]
            n_img = tl.load(n_ptr + plane + offs_n, mask=n_mask, other=0.0).to(DOT)
            n_txt = tl.load(n_ptr + 2 * plane + offs_n, mask=n_mask, other=0.0).to(DOT)
            if ITM:
                n_itm = tl.load(n_ptr + offs_n, mask=n_mask, other=0.0)
                nz = tl.load(nz_ptr + offs_n, mask=n_mask, other=0.0)
                nz_rowsum += tl.sum(nz, axis=1)
            ck_mask = col_ok[:, None] & k_ok[None, :]
            w = tl.load(w_ptr + cols64[:, None] * D + ks[None, :], mask=ck_mask, other=0.0).to(DOT)
            acc_gi += tl.dot(n_img, w, input_precision=PRECISION)
            acc_gt += tl.dot(n_txt, w, input_precision=PRECISION)
            if PER_ROW_TEXT and not ITM:
                # d f_T has no ITM part: zero everywhere but at the label (written after the loop).
                offs = rows64[:, None] * C + cols64[None, :]
                not_label = cols64[None, :] != y[:, None]
                tl.store(d_txt_ptr + offs[:, :, None] * D + ks[None, None, :],
                         tl.zeros([BLOCK_B, BLOCK_C, BLOCK_D], dtype=d_txt_ptr.dtype.element_ty),
                         mask=(tile_mask & not_label)[:, :, None] & k_ok[None, None, :])
            elif PER_ROW_TEXT:
                offs = rows64[:, None] * C + cols64[None, :]
                inv_nt = tl.load(inv_norm_txt_ptr + offs, mask=tile_mask, other=0.0)
                f_t = tl.load(
                    txt_ptr + offs[:, :, None] * D + ks[None, None, :],
                    mask=tile_mask[:, :, None] & k_ok[None, None, :], other=0.0,
                ).to(tl.float32)
                n_scaled = n_itm.to(tl.float32) * inv_nt
                acc_u += tl.sum(n_scaled[:, :, None] * f_t, axis=1)
                # ITM gradient of each text vector: a s n / |t| (u - cos v), v = t / |t|.
                proj_t = tl.where(inv_nt < 1.0 / NORM_EPS, 1.0, 0.0)
                d_t = a_itm * ((s * n_scaled)[:, :, None] * u[:, None, :] - (nz * inv_nt * inv_nt * proj_t)[:, :, None] * f_t)
                # The label's column also gets the CAT part, known only after the loop: written there.
                not_label = cols64[None, :] != y[:, None]
                tl.store(
                    d_txt_ptr + offs[:, :, None] * D + ks[None, None, :], d_t.to(d_txt_ptr.dtype.element_ty),
                    mask=(tile_mask & not_label)[:, :, None] & k_ok[None, None, :],
                )
            elif ITM:
                inv_nt = tl.load(inv_norm_txt_ptr + cols64, mask=col_ok, other=0.0)
                f_t = tl.load(txt_ptr + cols64[:, None] * D + ks[None, :], mask=ck_mask, other=0.0).to(tl.float32)
                # Unit text vectors as the operand: bounded, whatever the feature norms.
                v = (f_t * inv_nt[:, None]).to(DOT)
                acc_u += tl.dot(n_itm.to(DOT), v, input_precision=PRECISION)
        gamma_i = tl.load(gamma_i_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        gamma_t = tl.load(gamma_t_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        # ITM: du = a s sum_c n v_c; the tangent projection du - (du . u) u, du . u = a sum_c n z.
        proj_i = tl.where(inv_ni < 1.0 / NORM_EPS, 1.0, 0.0)
        d_i = a_cat * gamma_i[None, :] * acc_gi
        if ITM:
            d_i += a_itm * (s * acc_u - (nz_rowsum * proj_i)[:, None] * u) * inv_ni[:, None]
        tl.store(d_img_ptr + rows64[:, None] * D + ks[None, :], d_i.to(d_img_ptr.dtype.element_ty), mask=rk_mask)
        dg_t = gamma_t[None, :] * acc_gt
        gather_mask = (row_ok & label_ok)[:, None] & k_ok[None, :]
        f_tt = tl.load(txt_ptr + true_txt_row[:, None] + ks[None, :], mask=gather_mask, other=0.0).to(tl.float32)
        if PER_ROW_TEXT:
            y_safe = tl.where(label_ok, y, 0)
            label_ok_row = row_ok & label_ok
            n_y = tl.load(n_ptr + rows64 * LDC + y_safe, mask=label_ok_row, other=0.0).to(tl.float32)
            nz_y = tl.load(nz_ptr + rows64 * LDC + y_safe, mask=label_ok_row, other=0.0)
            inv_nt_y = tl.load(inv_norm_txt_ptr + rows64 * C + y_safe, mask=label_ok_row, other=0.0)
            proj_y = tl.where(inv_nt_y < 1.0 / NORM_EPS, 1.0, 0.0)
            d_t_y = a_cat * dg_t
            if ITM:
                d_t_y += a_itm * ((s * n_y * inv_nt_y)[:, None] * u - (nz_y * inv_nt_y * inv_nt_y * proj_y)[:, None] * f_tt)
            tl.store(d_txt_ptr + true_txt_row[:, None] + ks[None, :], d_t_y.to(d_txt_ptr.dtype.element_ty),
                     mask=gather_mask)
        else:
            tl.store(dg_txt_ptr + rows64[:, None] * D + ks[None, :], dg_t, mask=rk_mask)
        n_row_blocks = tl.num_programs(0)
        part_row = pid_b * D + ks
        part_plane = n_row_blocks * D
        tl.store(part_ptr + part_row, a_cat * tl.sum(acc_gi * f_i, axis=0), mask=k_ok)
        tl.store(part_ptr + part_plane + part_row, a_cat * tl.sum(acc_gi, axis=0), mask=k_ok)
        tl.store(part_ptr + 2 * part_plane + part_row, a_cat * tl.sum(acc_gt * f_tt, axis=0), mask=k_ok)
        tl.store(part_ptr + 3 * part_plane + part_row, a_cat * tl.sum(acc_gt, axis=0), mask=k_ok)

    @triton.jit
    def _class_grad_kernel(
        img_ptr, txt_ptr, labels_ptr, gamma_i_ptr, beta_i_ptr, gamma_t_ptr, beta_t_ptr,
        scale_ptr, scale_value, grad_loss_ptr, coef_itm, coef_cat,
        inv_norm_img_ptr, inv_norm_txt_ptr, n_ptr, nz_ptr, dg_txt_ptr,
        dw_ptr, db_ptr, d_txt_ptr, dw_part_ptr, db_part_ptr, d_txt_part_ptr, ticket_ptr,
        vec_part_ptr, d_gamma_i_ptr, d_beta_i_ptr, d_gamma_t_ptr, d_beta_t_ptr, n_row_blocks,
        B, C, D, LDC, rows_per_split,
        PER_ROW_TEXT: tl.constexpr, ITM: tl.constexpr, SCALE_FROM_PTR: tl.constexpr, SPLIT: tl.constexpr,
        DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Reductions over the rows of one split for a block of classes and a slice of features.

        Writes dW [C, D], db [C] and, for shared text [C, D], d f_T (ITM part plus the CAT text
        rows scattered to their labels) in their own dtypes. With SPLIT (several row splits) each
        program writes fp32 partials [splits, C, D] / [splits, C]; the last program of its
        (class, feature) tile to take a ticket sums them in split order and writes the result.
        The programs of the first class block and split also finish dgamma/dbeta: the row kernel's
        per-row-block partials [4, n_row_blocks, D], summed in order (deterministic)."""
        pid_c = tl.program_id(0)
        pid_d = tl.program_id(1)
        split = tl.program_id(2)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        cols64 = cols.to(tl.int64)
        ks = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        k_ok = ks < D
        s = _load_scale(scale_ptr, scale_value, SCALE_FROM_PTR)
        g = tl.load(grad_loss_ptr).to(tl.float32)
        a_itm = g * coef_itm
        a_cat = g * coef_cat
        gamma_i = tl.load(gamma_i_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        beta_i = tl.load(beta_i_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        gamma_t = tl.load(gamma_t_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        beta_t = tl.load(beta_t_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        plane = B * LDC
        acc_w = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
        acc_v = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
        acc_scatter = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
        nz_colsum = tl.zeros([BLOCK_C], dtype=tl.float32)
        row_start = split * rows_per_split
        row_end = tl.minimum(row_start + rows_per_split, B)
        for r0 in range(row_start, row_end, BLOCK_B):
            rows = r0 + tl.arange(0, BLOCK_B)
            row_ok = rows < row_end
            rows64 = rows.to(tl.int64)
            y, label_ok, true_txt_row = _labels(labels_ptr, rows, rows64, row_ok, C, D, PER_ROW_TEXT)
            tile_mask = row_ok[:, None] & col_ok[None, :]
            # n, nz: whole aligned rows up to LDC (the padding holds zeros).
            offs = rows64[:, None] * LDC + cols64[None, :]
            n_mask = row_ok[:, None] & (cols < LDC)[None, :]
            n_img = tl.load(n_ptr + plane + offs, mask=n_mask, other=0.0)
            n_txt = tl.load(n_ptr + 2 * plane + offs, mask=n_mask, other=0.0)
            rk_mask = row_ok[:, None] & k_ok[None, :]
            f_i = tl.load(img_ptr + rows64[:, None] * D + ks[None, :], mask=rk_mask, other=0.0).to(tl.float32)
            f_tt = tl.load(txt_ptr + true_txt_row[:, None] + ks[None, :], mask=(row_ok & label_ok)[:, None] & k_ok[None, :],
                           other=0.0).to(tl.float32)
            g_i = tl.where(rk_mask, f_i * gamma_i[None, :] + beta_i[None, :], 0.0).to(DOT)
            g_t = tl.where(rk_mask, f_tt * gamma_t[None, :] + beta_t[None, :], 0.0).to(DOT)
            acc_w += tl.dot(tl.trans(n_img.to(DOT)), g_i, input_precision=PRECISION)
            acc_w += tl.dot(tl.trans(n_txt.to(DOT)), g_t, input_precision=PRECISION)
            acc_b += tl.sum(n_img.to(tl.float32) + n_txt.to(tl.float32), axis=0)
            if not PER_ROW_TEXT:
                if ITM:
                    n_itm = tl.load(n_ptr + offs, mask=n_mask, other=0.0).to(DOT)
                    inv_ni = tl.load(inv_norm_img_ptr + rows, mask=row_ok, other=0.0)
                    # Unit image vectors as the operand (bounded).
                    u = (f_i * inv_ni[:, None]).to(DOT)
                    acc_v += tl.dot(tl.trans(n_itm), u, input_precision=PRECISION)
                    nz_colsum += tl.sum(tl.load(nz_ptr + offs, mask=n_mask, other=0.0), axis=0)
                # Scatter-add of the CAT text-row gradients to their labels, as a one-hot product.
                onehot = tl.where(tile_mask & (cols64[None, :] == y[:, None]), 1.0, 0.0).to(DOT)
                dg_t = tl.load(dg_txt_ptr + rows64[:, None] * D + ks[None, :], mask=rk_mask, other=0.0).to(DOT)
                acc_scatter += tl.dot(tl.trans(onehot), dg_t, input_precision=PRECISION)
        ck_mask = col_ok[:, None] & k_ok[None, :]
        out_offs = cols64[:, None] * D + ks[None, :]
        dw_val = a_cat * acc_w
        db_val = a_cat * acc_b
        if not PER_ROW_TEXT:
            dt_val = a_cat * acc_scatter
            if ITM:
                inv_nt = tl.load(inv_norm_txt_ptr + cols64, mask=col_ok, other=0.0)
                f_t = tl.load(txt_ptr + out_offs, mask=ck_mask, other=0.0).to(tl.float32)
                proj_t = tl.where(inv_nt < 1.0 / NORM_EPS, 1.0, 0.0)
                # ITM: dv = a s sum_b n u_b; (dv - (dv . v) v) / |t| with dv . v = a sum_b n z. All of
                # it is linear in the rows, so the split partials add up.
                dt_val += a_itm * (s * acc_v - (nz_colsum * inv_nt * proj_t)[:, None] * f_t) * inv_nt[:, None]
        if SPLIT:
            n_splits = tl.num_programs(2)
            part_offs = split * C * D + out_offs
            tl.store(dw_part_ptr + part_offs, dw_val, mask=ck_mask)
            tl.store(db_part_ptr + split * C + cols64, db_val, mask=col_ok & (pid_d == 0))
            if not PER_ROW_TEXT:
                tl.store(d_txt_part_ptr + part_offs, dt_val, mask=ck_mask)
            # The last split to finish this tile sums every split's partial, in split order.
            ticket = tl.atomic_add(ticket_ptr + pid_c * tl.num_programs(1) + pid_d, 1, sem="acq_rel")
            if ticket == n_splits - 1:
                dw_val = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
                db_val = tl.zeros([BLOCK_C], dtype=tl.float32)
                dt_val = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
                for j in range(0, n_splits):
                    dw_val += tl.load(dw_part_ptr + j * C * D + out_offs, mask=ck_mask, other=0.0, cache_modifier=".cg")
                    db_val += tl.load(db_part_ptr + j * C + cols64, mask=col_ok, other=0.0, cache_modifier=".cg")
                    if not PER_ROW_TEXT:
                        dt_val += tl.load(d_txt_part_ptr + j * C * D + out_offs, mask=ck_mask, other=0.0,
                                          cache_modifier=".cg")
                tl.store(dw_ptr + out_offs, dw_val.to(dw_ptr.dtype.element_ty), mask=ck_mask)
                tl.store(db_ptr + cols64, db_val.to(db_ptr.dtype.element_ty), mask=col_ok & (pid_d == 0))
                if not PER_ROW_TEXT:
                    tl.store(d_txt_ptr + out_offs, dt_val.to(d_txt_ptr.dtype.element_ty), mask=ck_mask)
        else:
            tl.store(dw_ptr + out_offs, dw_val.to(dw_ptr.dtype.element_ty), mask=ck_mask)
            tl.store(db_ptr + cols64, db_val.to(db_ptr.dtype.element_ty), mask=col_ok & (pid_d == 0))
            if not PER_ROW_TEXT:
                tl.store(d_txt_ptr + out_offs, dt_val.to(d_txt_ptr.dtype.element_ty), mask=ck_mask)
        if (pid_c == 0) & (split == 0):
            sum_gi = tl.zeros([BLOCK_D], dtype=tl.float32)
            sum_bi = tl.zeros([BLOCK_D], dtype=tl.float32)
            sum_gt = tl.zeros([BLOCK_D], dtype=tl.float32)
            sum_bt = tl.zeros([BLOCK_D], dtype=tl.float32)
            vec_plane = n_row_blocks * D
            for rb in range(0, n_row_blocks):
                sum_gi += tl.load(vec_part_ptr + rb * D + ks, mask=k_ok, other=0.0)
                sum_bi += tl.load(vec_part_ptr + vec_plane + rb * D + ks, mask=k_ok, other=0.0)
                sum_gt += tl.load(vec_part_ptr + 2 * vec_plane + rb * D + ks, mask=k_ok, other=0.0)
                sum_bt += tl.load(vec_part_ptr + 3 * vec_plane + rb * D + ks, mask=k_ok, other=0.0)
            tl.store(d_gamma_i_ptr + ks, sum_gi.to(d_gamma_i_ptr.dtype.element_ty), mask=k_ok)
            tl.store(d_beta_i_ptr + ks, sum_bi.to(d_beta_i_ptr.dtype.element_ty), mask=k_ok)
            tl.store(d_gamma_t_ptr + ks, sum_gt.to(d_gamma_t_ptr.dtype.element_ty), mask=k_ok)
            tl.store(d_beta_t_ptr + ks, sum_bt.to(d_beta_t_ptr.dtype.element_ty), mask=k_ok)

    @triton.jit
    def _logits_kernel(
        img_ptr, txt_ptr, gamma_i_ptr, beta_i_ptr, w_ptr, bias_ptr, scale_ptr, scale_value, out_ptr,
        B, C, D, w_itm, w_cat,
        PER_ROW_TEXT: tl.constexpr, SCALE_FROM_PTR: tl.constexpr, FUSE: tl.constexpr, DOT: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """out [B, C] fp32 = w_itm z_ITM + w_cat z_CAT(g_I) (FUSE), or z_CAT alone."""
        pid_b = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        rows64 = rows.to(tl.int64)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        cols64 = cols.to(tl.int64)
        acc_cat = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        raw_itm = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        ssq_i = tl.zeros([BLOCK_B], dtype=tl.float32)
        if PER_ROW_TEXT:
            ssq_t = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        else:
            ssq_t = tl.zeros([BLOCK_C], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            k_ok = ks < D
            f_i = tl.load(img_ptr + rows64[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            f_i32 = f_i.to(tl.float32)
            gamma_i = tl.load(gamma_i_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            beta_i = tl.load(beta_i_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols64[:, None] * D + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            g_i = (f_i32 * gamma_i[None, :] + beta_i[None, :]).to(DOT)
            acc_cat += tl.dot(g_i, tl.trans(w.to(DOT)), input_precision=PRECISION)
            if FUSE:
                ssq_i += tl.sum(f_i32 * f_i32, axis=1)
                if PER_ROW_TEXT:
                    f_t = tl.load(
                        txt_ptr + (rows64[:, None, None] * C + cols64[None, :, None]) * D + ks[None, None, :],
                        mask=row_ok[:, None, None] & col_ok[None, :, None] & k_ok[None, None, :], other=0.0,
                    ).to(tl.float32)
                    raw_itm += tl.sum(f_i32[:, None, :] * f_t, axis=2)
                    ssq_t += tl.sum(f_t * f_t, axis=2)
                else:
                    f_t = tl.load(txt_ptr + cols64[:, None] * D + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                    raw_itm += tl.dot(f_i.to(DOT), tl.trans(f_t.to(DOT)), input_precision=PRECISION)
                    f_t32 = f_t.to(tl.float32)
                    ssq_t += tl.sum(f_t32 * f_t32, axis=1)
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        out = acc_cat + bias[None, :]
        if FUSE:
            s = _load_scale(scale_ptr, scale_value, SCALE_FROM_PTR)
            inv_ni = 1.0 / tl.maximum(tl.sqrt(ssq_i), NORM_EPS)
            inv_nt = 1.0 / tl.maximum(tl.sqrt(ssq_t), NORM_EPS)
            if PER_ROW_TEXT:
                z_itm = s * raw_itm * inv_ni[:, None] * inv_nt
            else:
                z_itm = s * raw_itm * inv_ni[:, None] * inv_nt[None, :]
            out = w_itm * z_itm + w_cat * out
        tl.store(out_ptr + rows64[:, None] * C + cols64[None, :], out, mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers (plain tensors in, plain tensors out). Inputs are made contiguous by the op bodies.


def _dot_types(dtype: torch.dtype):
    """(Triton operand dtype, torch dtype of the stored logit gradients, input_precision) for the
    dots, from the features' dtype. fp32 runs exact fp32 ("ieee") dots; fp16/bf16 run native
    half-precision dots with fp32 accumulation, except bf16 under the interpreter, whose bf16 dot
    is wrong (docs/kernels.md): there it computes in fp32."""
    if dtype == torch.float16:
        return tl.float16, torch.float16, "ieee"
    if dtype == torch.bfloat16 and not triton_interpreter_enabled():
        return tl.bfloat16, torch.bfloat16, "ieee"
    return tl.float32, torch.float32, "ieee"


def _scale_args(scale_t: Optional[torch.Tensor], scale_f: float):
    if scale_t is None:
        return scale_f, scale_f, False  # the pointer argument is unused; any scalar fills it
    return scale_t, 0.0, True


def _launch_loss_forward(f_i, f_t, labels, g_i, b_i, g_t, b_t, w, bias, scale_t, scale_f, lam):
    """Two launches: the sliced forward and the merge. Returns (loss [], lse [3, B], 1/|f_I| [B],
    1/|f_T| [C] or [B, C]), all fp32."""
    b, d = f_i.shape
    c = w.shape[0]
    per_row = f_t.ndim == 3
    blocks = _pick_blocks(b, c, d, per_row, f_i.dtype, device_arch(f_i.device))
    dev = f_i.device
    loss = torch.empty((), device=dev, dtype=torch.float32)
    lse = torch.empty(3, b, device=dev, dtype=torch.float32)
    inv_norm_img = torch.empty(b, device=dev, dtype=torch.float32)
    inv_norm_txt = torch.empty((b, c) if per_row else (c,), device=dev, dtype=torch.float32)
    scale_ptr, scale_value, from_ptr = _scale_args(scale_t, scale_f)
    dot, _, precision = _dot_types(f_i.dtype)
    row_blocks = triton.cdiv(b, blocks.rows)
    class_splits = _class_splits(blocks, row_blocks, c, dev)
    # Whole class tiles per slice, so no slice is empty.
    cols_per_split = triton.cdiv(triton.cdiv(c, blocks.classes), class_splits) * blocks.classes
    class_splits = triton.cdiv(c, cols_per_split)
    stats = torch.empty(9, class_splits, b, device=dev, dtype=torch.float32)
    _loss_fwd_kernel[(row_blocks, class_splits)](
        f_i, f_t, labels, g_i, b_i, g_t, b_t, w, bias,
        scale_ptr, scale_value, stats, inv_norm_img, inv_norm_txt,
        b, c, d, cols_per_split,
        PER_ROW_TEXT=per_row, ITM=lam < 1.0, SCALE_FROM_PTR=from_ptr, DOT=dot, PRECISION=precision,
        BLOCK_B=blocks.rows, BLOCK_C=blocks.classes, BLOCK_D=blocks.features,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    _lse_merge_kernel[(1,)](
        stats, labels, scale_ptr, scale_value, loss, lse, b, c, class_splits, (1.0 - lam) / b, lam / (2.0 * b),
        SCALE_FROM_PTR=from_ptr, BLOCK_B=128,
    )
    return loss, lse, inv_norm_img, inv_norm_txt


def _launch_loss_backward(grad, f_i, f_t, labels, g_i, b_i, g_t, b_t, w, bias, scale_t, scale_f, lam, lse, inv_ni, inv_nt):
    """Three launches; returns the gradients of (f_I, f_T, gamma_I, beta_I, gamma_T, beta_T, W, b)."""
    b, d = f_i.shape
    c = w.shape[0]
    per_row = f_t.ndim == 3
    dev = f_i.device
    blocks = _pick_blocks(b, c, d, per_row, f_i.dtype, device_arch(f_i.device))
    scale_ptr, scale_value, from_ptr = _scale_args(scale_t, scale_f)
    dot, n_dtype, precision = _dot_types(f_i.dtype)
    common = dict(PER_ROW_TEXT=per_row, ITM=lam < 1.0, SCALE_FROM_PTR=from_ptr, DOT=dot, PRECISION=precision,
                  BLOCK_B=blocks.rows, BLOCK_C=blocks.classes, BLOCK_D=blocks.features,
                  num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    grad = grad.reshape(()).to(device=dev, dtype=torch.float32)
    coef_itm, coef_cat = (1.0 - lam) / b, lam / (2.0 * b)
    ldc = _padded(c)
    row_blocks = triton.cdiv(b, blocks.rows)
    class_blocks, feature_blocks = triton.cdiv(c, blocks.classes), triton.cdiv(d, blocks.features)
    splits = _row_splits(blocks, b, c, d, dev)
    # Whole row blocks per split, so a block never straddles two splits.
    rows_per_split = triton.cdiv(row_blocks, splits) * blocks.rows
    splits = triton.cdiv(b, rows_per_split)

    n = torch.empty(3, b, ldc, device=dev, dtype=n_dtype)
    nz = torch.empty(b, ldc, device=dev, dtype=torch.float32)
    tickets = torch.empty(class_blocks * feature_blocks if splits > 1 else 1, device=dev, dtype=torch.int32)
    _logit_grad_kernel[(row_blocks, triton.cdiv(c, blocks.classes))](
        f_i, f_t, labels, g_i, b_i, g_t, b_t, w, bias,
        scale_ptr, scale_value, lse, inv_ni, inv_nt, n, nz, tickets, tickets.numel() if splits > 1 else 0,
        b, c, d, ldc, **common,
    )

    d_img = torch.empty_like(f_i)
    d_txt = torch.empty_like(f_t)
    dg_txt = torch.empty(b, d, device=dev, dtype=torch.float32) if not per_row else nz  # unused when per-row
    vec_parts = torch.empty(4, row_blocks, d, device=dev, dtype=torch.float32)
    _row_grad_kernel[(row_blocks, feature_blocks)](
        f_i, f_t, labels, g_i, g_t, w, scale_ptr, scale_value, grad, coef_itm, coef_cat,
        inv_ni, inv_nt, n, nz, d_img, d_txt if per_row else d_img, dg_txt, vec_parts, b, c, d, ldc, **common,
    )

    d_w, d_b = torch.empty_like(w), torch.empty_like(bias)
    if splits > 1:
        dw_part = torch.empty(splits, c, d, device=dev, dtype=torch.float32)
        db_part = torch.empty(splits, c, device=dev, dtype=torch.float32)
        d_txt_part = torch.empty(splits, c, d, device=dev, dtype=torch.float32) if not per_row else dw_part
    else:
        dw_part, db_part, d_txt_part = d_w, d_b, d_w  # unused
    vec = [torch.empty_like(t) for t in (g_i, b_i, g_t, b_t)]
    _class_grad_kernel[(class_blocks, feature_blocks, splits)](
        f_i, f_t, labels, g_i, b_i, g_t, b_t, scale_ptr, scale_value, grad, coef_itm, coef_cat,
        inv_ni, inv_nt, n, nz, dg_txt, d_w, d_b, d_w if per_row else d_txt, dw_part, db_part, d_txt_part, tickets,
        vec_parts, *vec, row_blocks, b, c, d, ldc, rows_per_split, SPLIT=splits > 1, **common,
    )
    return (d_img, d_txt, *vec, d_w, d_b)


def _launch_logits(f_i, f_t, g_i, b_i, w, bias, scale_t, scale_f, lam, fuse):
    b, d = f_i.shape
    c = w.shape[0]
    per_row = f_t.ndim == 3
    blocks = _pick_blocks(b, c, d, per_row, f_i.dtype, device_arch(f_i.device))
    out = torch.empty(b, c, device=f_i.device, dtype=torch.float32)
    scale_ptr, scale_value, from_ptr = _scale_args(scale_t, scale_f)
    dot, _, precision = _dot_types(f_i.dtype)
    grid = (triton.cdiv(b, blocks.rows), triton.cdiv(c, blocks.classes))
    _logits_kernel[grid](
        f_i, f_t, g_i, b_i, w, bias, scale_ptr, scale_value, out, b, c, d, 1.0 - lam, lam,
        PER_ROW_TEXT=per_row, SCALE_FROM_PTR=from_ptr, FUSE=fuse, DOT=dot, PRECISION=precision,
        BLOCK_B=blocks.rows, BLOCK_C=blocks.classes, BLOCK_D=blocks.features,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Torch custom ops: opaque to torch.compile (fake kernels give output shapes), autograd registered.
# The data-dependent checks (label range, NaN/inf) run inside the op bodies, which always see real
# tensors, so they keep working in a compiled graph.


def _contig(*ts):
    return [t.contiguous() for t in ts]


@torch.library.custom_op("fastprompt::cat_head_loss", mutates_args=())
def _cat_head_loss_op(
    image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor,
    gamma_img: torch.Tensor, beta_img: torch.Tensor, gamma_txt: torch.Tensor, beta_txt: torch.Tensor,
    weight: torch.Tensor, bias: torch.Tensor, logit_scale: Optional[torch.Tensor], logit_scale_value: float, lam: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss [], lse [3, B], inv_norm_img [B], inv_norm_txt [C] or [B, C]); all fp32."""
    if CHECK_VALUES:
        check_cat_head_values(
            image_features, text_features, labels, num_classes=weight.shape[0],
            logit_scale=logit_scale if logit_scale is not None else logit_scale_value,
        )
    return _launch_loss_forward(
        *_contig(image_features, text_features, labels, gamma_img, beta_img, gamma_txt, beta_txt, weight, bias),
        logit_scale, logit_scale_value, lam,
    )


@_cat_head_loss_op.register_fake
def _(image_features, text_features, labels, gamma_img, beta_img, gamma_txt, beta_txt, weight, bias,
      logit_scale, logit_scale_value, lam):
    b, c = image_features.shape[0], weight.shape[0]
    new = lambda *shape: image_features.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return new(), new(3, b), new(b), new(b, c) if text_features.ndim == 3 else new(c)


@torch.library.custom_op("fastprompt::cat_head_loss_backward", mutates_args=())
def _cat_head_loss_backward_op(
    grad: torch.Tensor, image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor,
    gamma_img: torch.Tensor, beta_img: torch.Tensor, gamma_txt: torch.Tensor, beta_txt: torch.Tensor,
    weight: torch.Tensor, bias: torch.Tensor, logit_scale: Optional[torch.Tensor], logit_scale_value: float, lam: float,
    lse: torch.Tensor, inv_norm_img: torch.Tensor, inv_norm_txt: torch.Tensor,
) -> List[torch.Tensor]:
    """Gradients for (image_features, text_features, gamma_img, beta_img, gamma_txt, beta_txt, weight, bias)."""
    return list(_launch_loss_backward(
        grad, *_contig(image_features, text_features, labels, gamma_img, beta_img, gamma_txt, beta_txt, weight, bias),
        logit_scale, logit_scale_value, lam, lse, inv_norm_img, inv_norm_txt,
    ))


@_cat_head_loss_backward_op.register_fake
def _(grad, image_features, text_features, labels, gamma_img, beta_img, gamma_txt, beta_txt, weight, bias,
      logit_scale, logit_scale_value, lam, lse, inv_norm_img, inv_norm_txt):
    return [torch.empty_like(t, memory_format=torch.contiguous_format)
            for t in (image_features, text_features, gamma_img, beta_img, gamma_txt, beta_txt, weight, bias)]


def _loss_setup_context(ctx, inputs, output):
    (f_i, f_t, labels, g_i, b_i, g_t, b_t, w, bias, scale_t, scale_f, lam) = inputs
    _, lse, inv_ni, inv_nt = output
    ctx.save_for_backward(f_i, f_t, labels, g_i, b_i, g_t, b_t, w, bias, scale_t, lse, inv_ni, inv_nt)
    ctx.scale_f, ctx.lam = scale_f, lam
    ctx.mark_non_differentiable(lse, inv_ni, inv_nt)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics (three launches)


def _loss_backward(ctx, grad_loss, *_unused):
    if grad_loss is None:
        return (None,) * 12
    f_i, f_t, labels, g_i, b_i, g_t, b_t, w, bias, scale_t, lse, inv_ni, inv_nt = ctx.saved_tensors
    d_img, d_txt, d_gi, d_bi, d_gt, d_bt, d_w, d_b = _cat_head_loss_backward_op(
        grad_loss, f_i, f_t, labels, g_i, b_i, g_t, b_t, w, bias, scale_t, ctx.scale_f, ctx.lam, lse, inv_ni, inv_nt,
    )
    # labels, logit_scale (CLIP's frozen temperature), its float twin and lam get no gradient.
    return d_img, d_txt, None, d_gi, d_bi, d_gt, d_bt, d_w, d_b, None, None, None


_cat_head_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


@torch.library.custom_op("fastprompt::cat_head_logits", mutates_args=())
def _cat_head_logits_op(
    image_features: torch.Tensor, text_features: torch.Tensor, gamma_img: torch.Tensor, beta_img: torch.Tensor,
    weight: torch.Tensor, bias: torch.Tensor, logit_scale: Optional[torch.Tensor], logit_scale_value: float,
    lam: float, fuse: bool,
) -> torch.Tensor:
    """Inference logits [B, C] fp32."""
    if CHECK_VALUES:
        check_cat_head_values(
            image_features, text_features, None, num_classes=weight.shape[0],
            logit_scale=logit_scale if logit_scale is not None else logit_scale_value,
        )
    return _launch_logits(
        *_contig(image_features, text_features, gamma_img, beta_img, weight, bias),
        logit_scale, logit_scale_value, lam, fuse,
    )


@_cat_head_logits_op.register_fake
def _(image_features, text_features, gamma_img, beta_img, weight, bias, logit_scale, logit_scale_value, lam, fuse):
    return image_features.new_empty((image_features.shape[0], weight.shape[0]), dtype=torch.float32)


def _logits_no_backward(ctx, grad):
    raise RuntimeError(
        "fastprompt.kernels.cat_head.cat_head_logits is an inference kernel and has no backward; "
        f"train with cat_head_loss, or differentiate the logits through {_FALLBACK}"
    )


_cat_head_logits_op.register_autograd(_logits_no_backward, setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------------------------------------
# Public ops: the reference's signatures.


def _split_scale(logit_scale, device: torch.device):
    """(tensor or None, float): a tensor scale is read by the kernel (no host sync, compile-safe),
    from the features' device (a CPU scalar with CUDA features is moved, as the reference does)."""
    if isinstance(logit_scale, torch.Tensor):
        return logit_scale.detach().reshape(()).to(device=device, dtype=torch.float32), 0.0
    return None, float(logit_scale)


def _check_runnable(op: str, image_features: torch.Tensor) -> None:
    check_triton_device(f"fastprompt.kernels.cat_head.{op}", _FALLBACK, image_features=image_features)
    if image_features.dtype == torch.float64:
        raise ValueError(
            f"{op}: the Triton kernels compute in float32 (fp32/fp16/bf16 inputs); for float64 use {_FALLBACK}"
        )
    if image_features.shape[0] == 0:
        raise ValueError(f"{op}: image_features holds no row (B = 0)")


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
    """DePT's training loss, fused: (1 - lam) CE(z_ITM, y) + lam CE(z_CAT, [y; y]) (mean).

    image_features [B, d], text_features [C, d] or [B, C, d] (raw, fp32/fp16/bf16), labels [B]
    (int64 or int32), gamma/beta [d], weight [C, d], bias [C], logit_scale = s (float or scalar
    tensor; frozen, gets no gradient). Returns a float32 scalar; gradients flow to the features,
    gamma/beta (both), weight and bias, each in its input's dtype.

    In a DePT-style research codebase, the CAT head's lines (channel-wise scale/shift layers on
    the text features gathered by label and on the image features, concatenated, a linear layer,
    cross-entropy against the labels repeated twice) are one call with lam=1.0 (the CAT head
    alone; the ITM work is skipped):

        loss_cat = cat_head_loss(img_feats, text_feats, labels,
                                 gamma_img=film_img.scale, beta_img=film_img.bias,
                                 gamma_txt=film_txt.scale, beta_txt=film_txt.bias,
                                 weight=linear.weight, bias=linear.bias, logit_scale=1.0, lam=1.0)

    and with logit_scale = CLIP's exp(logit_scale) and lam = the CAT weight the call is the
    whole objective, the ITM cross-entropy included (docs/drop-in.md).
    """
    check_cat_head_args(
        image_features, text_features, labels, gamma_img=gamma_img, beta_img=beta_img, gamma_txt=gamma_txt,
        beta_txt=beta_txt, weight=weight, bias=bias, logit_scale=logit_scale, lam=lam, check_values=False,
    )
    _check_runnable("cat_head_loss", image_features)
    scale_t, scale_f = _split_scale(logit_scale, image_features.device)
    loss, _, _, _ = _cat_head_loss_op(
        image_features, text_features, labels, gamma_img, beta_img, gamma_txt, beta_txt, weight, bias,
        scale_t, scale_f, float(lam),
    )
    return loss


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
    """DePT's base-class inference logits [B, C] float32, fused in one kernel (no backward).

    fuse=True: (1 - lam) z_ITM + lam z_CAT(gamma_img f_I + beta_img); fuse=False: z_CAT alone.
    """
    check_cat_head_args(
        image_features, text_features, gamma_img=gamma_img, beta_img=beta_img, weight=weight, bias=bias,
        logit_scale=logit_scale, lam=lam, check_values=False,
    )
    _check_runnable("cat_head_logits", image_features)
    scale_t, scale_f = _split_scale(logit_scale, image_features.device)
    return _cat_head_logits_op(
        image_features, text_features, gamma_img, beta_img, weight, bias, scale_t, scale_f, float(lam), bool(fuse),
    )
