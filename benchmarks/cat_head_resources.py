"""Compile every CAT head kernel for a Hopper GPU without one, and report its resources.

    python benchmarks/cat_head_resources.py            # table: registers, spill stack, shared memory
    python benchmarks/cat_head_resources.py --check    # exit 1 on a compile failure or a large spill

Builds each kernel with the tile sizes `cat_head` picks on a GPU, for fp32/fp16/bf16 features and
both text shapes, through Triton's own pipeline down to a cubin for sm_90a, then reads the cubin's
resource usage with the cuobjdump that ships in the triton wheel. This catches what the
interpreter cannot (code that only the GPU compiler rejects, register spills) at no device time.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

# Compiled kernels are needed, not interpreted ones: drop the switch before triton is imported.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastprompt.kernels import cat_head as ch  # noqa: E402

# The one variant with no spill-free tiling found: fp32, per-row text, _row_grad_kernel, 40 bytes.
SPILL_ALLOWANCE_BYTES = 64
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SCALARS_I32 = {"B", "C", "D", "rows_per_split", "cols_per_split", "n_row_blocks", "n_splits"}
SCALARS_F32 = {"scale_value", "coef_itm", "coef_cat", "w_itm", "w_cat"}
FEATURE_PTRS = {"img_ptr", "txt_ptr", "d_img_ptr", "d_txt_ptr"}
PARAM_PTRS = {"gamma_i_ptr", "beta_i_ptr", "gamma_t_ptr", "beta_t_ptr", "w_ptr", "bias_ptr"}


def _signature(kernel, constexprs, feat: str, n_dtype: str):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in SCALARS_I32:
            sig[name] = "i32"
        elif name in SCALARS_F32:
            sig[name] = "fp32"
        elif name in FEATURE_PTRS or name in PARAM_PTRS:
            sig[name] = f"*{feat}"
        elif name == "labels_ptr":
            sig[name] = "*i64"
        elif name == "n_ptr":
            sig[name] = f"*{n_dtype}"
        else:  # fp32 buffers: lse, norms, partial sums, grad_loss, scale pointer
            sig[name] = "*fp32"
    return sig


def _resources(cubin: bytes, cuobjdump: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if "REG:" in l)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"])}


def variants():
    """(kernel, constexprs, feature dtype name, stored-gradient dtype name, blocks) as a GPU launch would use."""
    cuda = torch.device("cuda")
    for dtype, feat in DTYPES.items():
        for per_row in (False, True):
            blocks = ch._pick_blocks(256, 1000, 512, per_row, cuda, dtype)
            dot = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
            common = dict(PER_ROW_TEXT=per_row, SCALE_FROM_PTR=True, DOT=dot, PRECISION="ieee",
                          BLOCK_B=blocks.rows, BLOCK_C=blocks.classes, BLOCK_D=blocks.features)
            for kernel in (ch._loss_fwd_kernel, ch._logit_grad_kernel, ch._row_grad_kernel,
                           ch._class_grad_kernel, ch._logits_kernel):
                constexprs = dict(common, FUSE=True) if kernel is ch._logits_kernel else common
                yield kernel, constexprs, feat, feat, blocks
    # The forward's log-sum-exp merge reads fp32 statistics only: one variant.
    yield ch._lse_merge_kernel, dict(BLOCK_B=128), "fp32", "fp32", ch.BlockSizes(128, 16, 16)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200)")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 on a compile failure or a spill over {SPILL_ALLOWANCE_BYTES} bytes")
    args = parser.parse_args(argv)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    print(f"triton {triton.__version__}, sm_{args.arch}")
    print(f"{'kernel':22} {'text':7} {'dtype':5} {'tiles B/C/D':12} {'warps':>5} {'regs':>5} {'spill B':>8} {'smem B':>7}")
    for kernel, constexprs, feat, n_dtype, blocks in variants():
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        text = "per-row" if constexprs.get("PER_ROW_TEXT") else "shared" if "PER_ROW_TEXT" in constexprs else "-"
        tiles = f"{blocks.rows}/{blocks.classes}/{blocks.features}"
        try:
            src = ASTSource(fn=kernel, signature=_signature(kernel, constexprs, feat, n_dtype), constexprs=constexprs)
            compiled = triton.compile(src, target=target,
                                      options={"num_warps": blocks.num_warps, "num_stages": blocks.num_stages})
            res = _resources(compiled.asm["cubin"], cuobjdump)
        except Exception as exc:  # report every variant, then fail
            failures += 1
            print(f"{name:22} {text:7} {feat:5} {tiles:12} FAILED: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if res["stack"] > SPILL_ALLOWANCE_BYTES:
            failures += int(args.check)
        print(f"{name:22} {text:7} {feat:5} {tiles:12} {blocks.num_warps:>5} {res['registers']:>5} "
              f"{res['stack']:>8} {compiled.metadata.shared:>7}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
