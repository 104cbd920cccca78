"""Static budget of the fused kernels: what the GPU build looks like, checked without a GPU.

    python benchmarks/static_budget.py                 # the CI subset (sm_90, bf16): prints the table
    python benchmarks/static_budget.py --full --write  # every scenario x dtype x arch; rewrites
                                                       # benchmarks/results/static_budget.{json,md}

Every kernel launch is captured from the real launchers (`kernels/decoupled_attention.py`,
`kernels/cat_head.py`) on CPU tensors of representative shapes and layouts; the recorded
arguments go through Triton's own JIT binder for a CUDA target, so each autotune config that
survives the launcher's pruning is compiled with exactly the specialisation the runtime applies
(16-byte-aligned pointers, integers divisible by 16 marked so, integers equal to 1 and unit
strides as constants), for sm_90 (H100/H200) and sm_80 (A100). For each compile it reads the
registers and spilled bytes (cuobjdump --dump-resource-usage), the shared memory, the MMA
instructions (wgmma / mma.sync / none, from the PTX) and the SASS instructions per iteration of
every inner loop. Minimal FlashAttention-2 loops (forward, dQ, dK/dV), compiled at the same tiles
from the same tensors, are the yardstick for the attention loops.
These are static compile facts of Triton's output, not timings.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

if os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0"):
    raise SystemExit("static_budget.py compiles real GPU kernels: run it without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import fastprompt.kernels  # noqa: E402,F401
from fastprompt.kernels import cat_head as ch  # noqa: E402

da = sys.modules["fastprompt.kernels.decoupled_attention"]  # the package attribute is the op
assert not da.INTERPRETED, "the kernels were decorated for the interpreter"

RESULTS = Path(__file__).resolve().parent / "results"
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# Shared memory per block (opt-in maximum): H100/H200 227 KB, A100 163 KB.
SMEM_LIMIT = {90: 232448, 80: 166912}
LOOP_BUDGET = 1.15  # inner-loop SASS of a fused kernel over the minimal FlashAttention loop
SM_COUNT = 132  # H100 SXM / H200: the CAT head's split heuristics read the multiprocessor count
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTENTION_KERNELS = ("_forward_kernel", "_backward_dq_kernel", "_backward_dkdv_kernel")
CAT_HEAD_KERNELS = ("_loss_fwd_kernel", "_lse_merge_kernel", "_logit_grad_kernel", "_row_grad_kernel",
                    "_class_grad_kernel", "_logits_kernel")


# ----------------------------------------------------------------------------------------------
# Minimal FlashAttention-2 loops: the yardstick (unmasked full blocks only, one state, one LSE)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _fa_head(H):
    """(batch, head) of this program, int64."""
    pid_bh = tl.program_id(0)
    return (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)


@triton.jit
def fa_forward(Q, K, V, Out, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
               H, N, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b, h = _fa_head(H)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=(offs_m < N)[:, None],
                other=0.0)
    k_ptrs = K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
    v_ptrs = V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, (N // BLOCK_N) * BLOCK_N, BLOCK_N):
        k = tl.load(k_ptrs + start_n * skn)
        s = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + start_n * svn)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
             (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=(offs_m < N)[:, None])


@triton.jit
def fa_dq(Q, K, V, DO, Lse, Delta, DQ, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
          sgb, sgh, sgn, sgd, H, N, qk_scale, sm_scale,
          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b, h = _fa_head(H)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = (offs_m < N)[:, None]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=m_ok, other=0.0)
    do = tl.load(DO + b * sgb + h * sgh + offs_m[:, None] * sgn + offs_d[None, :] * sgd, mask=m_ok, other=0.0)
    row = tl.program_id(0).to(tl.int64) * N + offs_m
    lse = tl.load(Lse + row, mask=offs_m < N, other=float("inf"))
    delta = tl.load(Delta + row, mask=offs_m < N, other=0.0)
    k_ptrs = K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
    v_ptrs = V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, (N // BLOCK_N) * BLOCK_N, BLOCK_N):
        k = tl.load(k_ptrs + start_n * skn)
        v = tl.load(v_ptrs + start_n * svn)
        s = tl.dot(q, tl.trans(k))
        p = tl.exp2(s * qk_scale - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    tl.store(DQ + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=m_ok)


@triton.jit
def fa_dkdv(Q, K, V, DO, Lse, Delta, DK, DV, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
            sgb, sgh, sgn, sgd, H, N, qk_scale, sm_scale,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b, h = _fa_head(H)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = (offs_n < N)[:, None]
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=n_ok, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=n_ok, other=0.0)
    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd
    do_ptrs = DO + b * sgb + h * sgh + offs_m[:, None] * sgn + offs_d[None, :] * sgd
    row0 = tl.program_id(0).to(tl.int64) * N
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start_m in range(0, (N // BLOCK_M) * BLOCK_M, BLOCK_M):
        q = tl.load(q_ptrs + start_m * sqn)
        do = tl.load(do_ptrs + start_m * sgn)
        lse = tl.load(Lse + row0 + start_m + offs_m)
        delta = tl.load(Delta + row0 + start_m + offs_m)
        s_t = tl.dot(k, tl.trans(q))
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    tl.store(DK + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, (dk * sm_scale).to(DK.dtype.element_ty),
             mask=n_ok)
    tl.store(DV + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, dv.to(DV.dtype.element_ty), mask=n_ok)


# The fused kernel each yardstick stands beside.
YARDSTICK = {"_forward_kernel": fa_forward, "_backward_dq_kernel": fa_dq, "_backward_dkdv_kernel": fa_dkdv}


# ----------------------------------------------------------------------------------------------
# Capturing the launches
# ----------------------------------------------------------------------------------------------

@dataclass
class Launch:
    kernel: str
    fn: object  # Autotuner or JITFunction
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel object: `kernel[grid](*args, **kwargs)` records instead of launching."""

    def __init__(self, name, fn, sink):
        self.name, self.fn, self.sink = name, fn, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append(Launch(self.name, self.fn, args, kwargs))


@contextmanager
def target_device(arch: int):
    """The launchers' device queries answer as a GPU of compute capability `arch` would."""
    saved = [(mod, name, getattr(mod, name)) for mod, name in ((ch, "_sm_count"), (ch, "device_arch"),
                                                               (da, "device_arch"))]
    ch._sm_count = lambda device: SM_COUNT
    ch.device_arch = da.device_arch = lambda device: arch
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


@contextmanager
def captured_launches(arch: int = 90):
    """Within the block, the fused kernels record their launches instead of running them."""
    sink: List[Launch] = []
    patched = [(mod, name, getattr(mod, name)) for mod, names in ((da, ATTENTION_KERNELS), (ch, CAT_HEAD_KERNELS))
               for name in names]
    for mod, name, fn in patched:
        setattr(mod, name, _Recorder(name, fn, sink))
    try:
        with target_device(arch):
            yield sink
    finally:
        for mod, name, fn in patched:
            setattr(mod, name, fn)


def expand_configs(launch: Launch, arch: int = 90) -> List[Tuple[object, dict, str]]:
    """(JIT function, kwargs, config label) for each config the runtime may run for this launch on `arch`."""
    fn = launch.fn
    if isinstance(fn, Autotuner):
        # The autotuner's own pruning, on the launch's own arguments.
        fn.nargs = dict(zip(fn.arg_names, launch.args))
        try:
            with target_device(arch):
                configs = fn.prune_configs(launch.kwargs) if len(fn.configs) > 1 else fn.configs
        finally:
            fn.nargs = None
        out = []
        for c in configs:
            kw = dict(launch.kwargs, **c.all_kwargs())
            out.append((fn.fn, kw, _label(kw)))
        return out
    return [(fn, dict(launch.kwargs), _label(launch.kwargs))]


def _label(kw: dict) -> str:
    tiles = [str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_B", "BLOCK_C", "BLOCK_D") if k in kw]
    return f"{'x'.join(tiles)}/w{kw.get('num_warps', 4)}/s{kw.get('num_stages', 3)}"


# ----------------------------------------------------------------------------------------------
# Compiling and reading the build
# ----------------------------------------------------------------------------------------------

@dataclass
class Loop:
    sass: int  # instructions per iteration (NOPs not counted)
    mma: Tuple[str, ...]  # its MMA instructions, in order


@dataclass
class Build:
    registers: int
    spill_bytes: int
    smem_bytes: int
    mma: str  # "wgmma", "mma.sync", "wgmma+mma.sync" or "none"
    loops: List[Loop]
    compile_s: float = 0.0


_BUILDS: Dict[tuple, Build] = {}
_BINDERS: Dict[tuple, object] = {}
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH = re.compile(r"\bBRA\b[^0-9]*0x([0-9a-f]+)")


def specialise(jit, kwargs: dict, args: tuple, arch: int):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run builds them for `arch`."""
    target = GPUTarget("cuda", arch, 32)
    key = (id(jit), arch)
    if key not in _BINDERS:
        backend = make_backend(target)
        _BINDERS[key] = (backend, create_function_from_signature(jit.signature, jit.params, backend))
    backend, binder = _BINDERS[key]
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    return target, signature, constexprs, attrs, options


def build(jit, kwargs: dict, args: tuple, arch: int) -> Build:
    import time

    target, signature, constexprs, attrs, options = specialise(jit, kwargs, args, arch)
    key = (jit.fn.__qualname__, arch, repr(signature), repr(sorted(constexprs.items(), key=str)),
           repr(sorted(attrs.items(), key=str)), repr(options))
    if key in _BUILDS:
        return _BUILDS[key]
    t0 = time.time()
    compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__)
    seconds = time.time() - t0
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([str(CUOBJDUMP), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    line = next(l for l in usage.splitlines() if "REG:" in l)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    has_wgmma, has_mma = "wgmma.mma_async" in ptx, "mma.sync" in ptx
    mma = "+".join(k for k, on in (("wgmma", has_wgmma), ("mma.sync", has_mma)) if on) or "none"
    result = Build(int(fields["REG"]), int(fields["STACK"]), int(compiled.metadata.shared), mma, sass_loops(sass),
                   seconds)
    _BUILDS[key] = result
    return result


def _opcode(text: str) -> str:
    words = text.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else ""


def sass_loops(sass: str) -> List[Loop]:
    """Every backward branch [target, branch] of the SASS listing: its instructions and MMAs."""
    instrs = [(int(a, 16), t.strip()) for a, t in _SASS_LINE.findall(sass)]
    loops = []
    for addr, text in instrs:
        if _opcode(text) != "BRA":
            continue
        m = _BRANCH.search(text)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= addr:
            continue
        body = [t for a, t in instrs if target <= a <= addr and _opcode(t) != "NOP"]
        # The opcode carries the MMA's shape and types (e.g. HGMMA.64x64x16.F32.BF16).
        mmas = tuple(_opcode(t) for t in body if _opcode(t).startswith(("HGMMA", "HMMA", "IMMA")))
        loops.append(Loop(len(body), mmas))
    return loops


def main_loop(b: Build, like: Optional[Build] = None) -> Optional[Loop]:
    """The cheapest loop of `b` holding the same MMAs as `like`'s loop (or any MMA): the unmasked
    steady state, the one that runs for every interior block."""
    target = None
    if like is not None and like.loops:
        target = sorted(like.loops, key=lambda l: -len(l.mma))[0].mma
    candidates = [l for l in b.loops if l.mma and (target is None or sorted(l.mma) == sorted(target))]
    return min(candidates, key=lambda l: l.sass) if candidates else None


# ----------------------------------------------------------------------------------------------
# Scenarios: representative shapes, layouts and rules, through the real launchers
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionScenario:
    name: str
    batch: int
    heads: int
    n: int
    head_dim: int
    prompt_start: int
    num_prompts: int
    causal: bool
    see_all: bool
    instance_mix: str
    prompt_mix: str
    seq_first: bool = False


def _weight(mix: str, heads: int):
    return 0.1 if mix == "fixed" else (torch.zeros(heads) if mix == "learned" else None)


ATTENTION_SCENARIOS = [
    # ViT-B/16 image tower (B=128 images), DPL's default rules.
    AttentionScenario("vision VPT-deep p=4, fixed/exact", 128, 12, 197 + 4, 64, 1, 4, False, False, "fixed", "exact"),
    AttentionScenario("vision MaPLe p=2, fixed/exact", 128, 12, 197 + 2, 64, 197, 2, False, False, "fixed", "exact"),
    AttentionScenario("vision p=16, learned/detached", 128, 12, 197 + 16, 64, 1, 16, False, False, "learned",
                      "detached"),
    AttentionScenario("vision seq-first p=4, fixed/exact", 128, 12, 197 + 4, 64, 1, 4, False, False, "fixed", "exact",
                      seq_first=True),
    # ViT-B/16 text tower: C=1000 class prompts, N=77, causal, prompt rows read the whole text.
    AttentionScenario("text p=2 see-all, fixed/exact", 1000, 8, 77, 64, 1, 2, True, True, "fixed", "exact"),
    AttentionScenario("text p=4 see-all, exact/exact", 1000, 8, 77, 64, 1, 4, True, True, "exact", "exact"),
    AttentionScenario("text p=4 truncated N=24, fixed/learned", 1000, 8, 24, 64, 1, 4, True, True, "fixed", "learned"),
]
CI_ATTENTION = ("vision VPT-deep p=4, fixed/exact", "text p=4 see-all, exact/exact")


def attention_launches(sc: AttentionScenario, dtype: torch.dtype, arch: int = 90) -> List[Launch]:
    """The forward and backward launches of one training step of the packed (module/encoder) op."""
    e = sc.heads * sc.head_dim
    lead = (sc.n, sc.batch) if sc.seq_first else (sc.batch, sc.n)
    qkv = torch.empty(*lead, 3 * e, dtype=dtype)
    out = torch.empty(*lead, e, dtype=dtype)
    dout = torch.empty(*lead, e, dtype=dtype)
    dqkv = torch.empty_like(qkv)
    q, k, v = da._packed_views(qkv, sc.heads, sc.seq_first)
    dq, dk, dv = da._packed_views(dqkv, sc.heads, sc.seq_first)
    out4, dout4 = (da._heads_view(t, sc.heads, sc.seq_first) for t in (out, dout))
    path = da.attention_path(num_prompts=sc.num_prompts, causal=sc.causal, prompt_rows_see_all=sc.see_all,
                             instance_mix=sc.instance_mix, prompt_mix=sc.prompt_mix)
    assert path != "sdpa", f"{sc.name}: dispatched to SDPA, no kernel to budget"
    theta_x, theta_p, scalars = da._scalars(
        sc.head_dim, prompt_start=sc.prompt_start, num_prompts=sc.num_prompts, causal=sc.causal,
        prompt_rows_see_all=sc.see_all, instance_mix=sc.instance_mix, prompt_mix=sc.prompt_mix,
        instance_weight=_weight(sc.instance_mix, sc.heads), prompt_weight=_weight(sc.prompt_mix, sc.heads),
        scale=None, path=path)
    with captured_launches(arch) as sink:
        lse, o_minor = da._run_forward(q, k, v, out4, theta_x, theta_p, *scalars)
        da._run_backward(dout4, q, k, v, out4, lse, o_minor, dq, dk, dv, theta_x, theta_p, *scalars)
    return sink


def yardstick_build(kernel: str, sc: AttentionScenario, dtype: torch.dtype, kw: dict, arch: int) -> Build:
    """The minimal FlashAttention loop for `kernel`, at the config in kw, on the scenario's tensors."""
    e = sc.heads * sc.head_dim
    lead = (sc.n, sc.batch) if sc.seq_first else (sc.batch, sc.n)
    qkv = torch.empty(*lead, 3 * e, dtype=dtype)
    q, k, v = da._packed_views(qkv, sc.heads, sc.seq_first)
    o = da._heads_view(torch.empty(*lead, e, dtype=dtype), sc.heads, sc.seq_first)
    stat = torch.empty(sc.batch * sc.heads * sc.n, dtype=torch.float32)
    strides = [s for t in (q, k, v) for s in t.stride()]
    scale = da._LOG2E / sc.head_dim ** 0.5
    meta = dict(HEAD_DIM=sc.head_dim, BLOCK_M=kw["BLOCK_M"], BLOCK_N=kw["BLOCK_N"], num_warps=kw["num_warps"],
                num_stages=kw["num_stages"])
    if kernel == "_forward_kernel":
        args = (q, k, v, o, *strides, *o.stride(), sc.heads, sc.n, scale)
    elif kernel == "_backward_dq_kernel":
        args = (q, k, v, o, stat, stat, q, *strides, *o.stride(), sc.heads, sc.n, scale, 0.125)
    else:
        args = (q, k, v, o, stat, stat, k, v, *strides, *o.stride(), sc.heads, sc.n, scale, 0.125)
    return build(YARDSTICK[kernel], meta, args, arch)


@dataclass(frozen=True)
class CatHeadScenario:
    name: str
    batch: int
    classes: int
    dim: int
    per_row_text: bool = False


CAT_HEAD_SCENARIOS = [
    CatHeadScenario("B=256 C=1000 d=512", 256, 1000, 512),
    CatHeadScenario("B=4 C=50 d=512", 4, 50, 512),
    CatHeadScenario("B=64 C=100 d=512", 64, 100, 512),
    CatHeadScenario("per-row text B=1 C=50 d=512", 1, 50, 512, per_row_text=True),
]
CI_CAT_HEAD = ("B=256 C=1000 d=512", "B=4 C=50 d=512")


def cat_head_launches(sc: CatHeadScenario, dtype: torch.dtype, arch: int = 90) -> List[Launch]:
    """The launches of one loss forward + backward and one inference call."""
    b, c, d = sc.batch, sc.classes, sc.dim
    f_i = torch.empty(b, d, dtype=dtype)
    f_t = torch.empty(b, c, d, dtype=dtype) if sc.per_row_text else torch.empty(c, d, dtype=dtype)
    labels = torch.zeros(b, dtype=torch.int64)
    vecs = [torch.empty(d, dtype=dtype) for _ in range(4)]
    w, bias = torch.empty(c, d, dtype=dtype), torch.empty(c, dtype=dtype)
    scale_t = torch.empty((), dtype=torch.float32)
    with captured_launches(arch) as sink:
        _, lse, inv_ni, inv_nt = ch._launch_loss_forward(f_i, f_t, labels, *vecs, w, bias, scale_t, 0.0, 0.7)
        ch._launch_loss_backward(torch.ones(()), f_i, f_t, labels, *vecs, w, bias, scale_t, 0.0, 0.7, lse, inv_ni,
                                 inv_nt)
        ch._launch_logits(f_i, f_t, vecs[0], vecs[1], w, bias, scale_t, 0.0, 0.7, True)
    return sink


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

@dataclass
class Row:
    op: str
    scenario: str
    kernel: str
    dtype: str
    arch: int
    config: str
    registers: int
    spill_bytes: int
    smem_bytes: int
    mma: str
    loop_sass: Optional[int]  # the cheapest inner loop (the unmasked steady state)
    loops: List[int] = field(default_factory=list)  # every inner loop's SASS count
    fa_loop_sass: Optional[int] = None  # the minimal FlashAttention loop at the same config
    ratio: Optional[float] = None
    wgmma_expected: bool = False


def _mma_rows(kernel: str, kw: dict) -> int:
    """The M dimension of the kernel's dots (the tile side that wgmma needs >= 64)."""
    if kernel == "_backward_dkdv_kernel":
        return kw["BLOCK_N"]
    if kernel == "_class_grad_kernel":
        return kw["BLOCK_C"]
    return kw.get("BLOCK_M", kw.get("BLOCK_B", 0))


def _row(op, scenario, launch_kernel, dtype, arch, jit, kw, args, yard=None) -> Row:
    b = build(jit, kw, args, arch)
    loop = main_loop(b, yard)
    fa_loop = main_loop(yard) if yard is not None else None
    dots = any(l.mma for l in b.loops) or b.mma != "none"
    return Row(op, scenario, launch_kernel, dtype, arch, _label(kw), b.registers, b.spill_bytes, b.smem_bytes, b.mma,
               loop.sass if loop else None, sorted(l.sass for l in b.loops),
               fa_loop.sass if fa_loop else None,
               round(loop.sass / fa_loop.sass, 3) if loop and fa_loop else None,
               wgmma_expected=arch >= 90 and dots and _mma_rows(launch_kernel, kw) >= 64)


def collect(full: bool, jobs: int = 2, ops=("attention", "cat_head")) -> List[Row]:
    """Every (scenario, dtype, arch, kernel, config) of the chosen set, compiled (cached)."""
    archs = (90, 80) if full else (90,)
    dtypes = ("bf16", "fp16", "fp32") if full else ("bf16",)
    work = []
    for arch in archs:
        for dt in dtypes:
            dtype = TORCH_DTYPES[dt]
            for sc in ATTENTION_SCENARIOS if "attention" in ops else ():
                if not full and sc.name not in CI_ATTENTION:
                    continue
                for launch in attention_launches(sc, dtype, arch):
                    for jit, kw, _ in expand_configs(launch, arch):
                        work.append(("attention", sc, launch, dt, arch, jit, kw))
            for sc in CAT_HEAD_SCENARIOS if "cat_head" in ops else ():
                if not full and sc.name not in CI_CAT_HEAD:
                    continue
                for launch in cat_head_launches(sc, dtype, arch):
                    for jit, kw, _ in expand_configs(launch, arch):
                        work.append(("cat_head", sc, launch, dt, arch, jit, kw))

    def one(item):
        op, sc, launch, dt, arch, jit, kw = item
        yard = None
        if op == "attention" and launch.kernel in YARDSTICK:
            yard = yardstick_build(launch.kernel, sc, TORCH_DTYPES[dt], kw, arch)
        return _row(op, sc.name, launch.kernel, dt, arch, jit, kw, launch.args, yard)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, work))


def violations(rows: List[Row]) -> List[str]:
    """Every budget a row breaks: spills, shared memory, wgmma where the tile allows it, loop SASS."""
    bad = []
    for r in rows:
        where = f"{r.op} {r.kernel} [{r.scenario}] {r.dtype} sm_{r.arch} {r.config}"
        if r.spill_bytes:
            bad.append(f"{where}: spills {r.spill_bytes} bytes")
        if r.smem_bytes > SMEM_LIMIT[r.arch]:
            bad.append(f"{where}: shared memory {r.smem_bytes} > {SMEM_LIMIT[r.arch]}")
        if r.wgmma_expected and r.mma != "wgmma" and r.dtype != "fp32":
            bad.append(f"{where}: MMA {r.mma}, expected wgmma for a >= 64-row tile")
        if r.ratio is not None and r.kernel in ("_forward_kernel", "_backward_dq_kernel") and r.ratio > LOOP_BUDGET:
            bad.append(f"{where}: inner loop {r.loop_sass} SASS = {r.ratio:.2f}x the minimal FlashAttention loop "
                       f"({r.fa_loop_sass}), budget {LOOP_BUDGET}x")
    return bad


def markdown(rows: List[Row]) -> str:
    head = ("| op | scenario | kernel | dtype | arch | config (tiles/warps/stages) | regs | spill B | smem B | MMA | "
            "loop SASS | FA loop | ratio | all loops |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r.op} | {r.scenario} | {r.kernel.strip('_')} | {r.dtype} | sm_{r.arch} | {r.config} | {r.registers} "
            f"| {r.spill_bytes} | {r.smem_bytes} | {r.mma} | {r.loop_sass if r.loop_sass is not None else '-'} | "
            f"{r.fa_loop_sass if r.fa_loop_sass is not None else '-'} | "
            f"{f'{r.ratio:.2f}' if r.ratio is not None else '-'} | {' '.join(map(str, r.loops)) or '-'} |")
    return "\n".join(lines)


QUOTED = (("attention", "vision VPT-deep p=4, fixed/exact"), ("attention", "text p=4 see-all, exact/exact"),
          ("cat_head", "B=256 C=1000 d=512"))


def summary(rows: List[Row]) -> str:
    """The excerpt docs/kernels.md quotes: bf16 on sm_90 for DPL's image-tower rules, the text tower's
    single-state path and the CAT head at B=256, plus one line over every row of the table."""
    head = "| scenario | kernel | config | regs | spill B | smem KB | MMA | loop SASS | FA loop | ratio |"
    lines = [head, "|" + "---|" * 10]
    for op, scenario in QUOTED:
        for r in rows:
            if (r.op, r.scenario, r.dtype, r.arch) != (op, scenario, "bf16", 90):
                continue
            lines.append(
                f"| {scenario} | {r.kernel.strip('_')} | {r.config} | {r.registers} | {r.spill_bytes} | "
                f"{r.smem_bytes / 1024:.0f} | {r.mma} | {r.loop_sass if r.loop_sass is not None else '-'} | "
                f"{r.fa_loop_sass if r.fa_loop_sass is not None else '-'} | "
                f"{f'{r.ratio:.2f}' if r.ratio is not None else '-'} |")
    attn = [r for r in rows if r.op == "attention" and r.ratio is not None]
    worst = {k: max((r.ratio for r in attn if r.kernel == k), default=None)
             for k in ("_forward_kernel", "_backward_dq_kernel", "_backward_dkdv_kernel")}
    ratio = {k: "-" if v is None else f"{v:.2f}x" for k, v in worst.items()}  # "-": a table without attention rows
    lines.append("")
    lines.append(
        f"Over all {len(rows)} rows ({len({r.scenario for r in rows})} scenarios x "
        f"{'/'.join(sorted({r.dtype for r in rows}))} x {'/'.join(f'sm_{a}' for a in sorted({r.arch for r in rows}))}): "
        f"spilled bytes max {max(r.spill_bytes for r in rows)}, shared memory max "
        f"{max(r.smem_bytes for r in rows) / 1024:.0f} KB, wgmma wherever expected "
        f"({sum(r.wgmma_expected and r.dtype != 'fp32' for r in rows)} rows); inner loop over the minimal "
        f"FlashAttention loop, worst case: forward {ratio['_forward_kernel']}, dQ {ratio['_backward_dq_kernel']}, "
        f"dK/dV {ratio['_backward_dkdv_kernel']} (not budgeted).")
    return "\n".join(lines)


def write(rows: List[Row], out_dir: Path, full: bool, meta: Optional[dict] = None) -> Tuple[Path, Path]:
    """static_budget.json (meta + rows) and static_budget.md (summary + every row) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = meta or {
        "what": "static compile facts of the fused kernels (Triton's GPU build, read without a GPU): "
                "NOT timings",
        "set": "full" if full else "ci",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loop_budget": LOOP_BUDGET,
        "smem_limit_bytes": {f"sm_{k}": v for k, v in SMEM_LIMIT.items()},
        "command": "python benchmarks/static_budget.py" + (" --full" if full else "") + " --write",
    }
    jpath, mpath = out_dir / "static_budget.json", out_dir / "static_budget.md"
    jpath.write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    mpath.write_text(
        "# Static budget of the fused kernels (compile facts, not timings)\n\n"
        f"Triton {meta['triton']}, written {meta['date']} by `{meta['command']}`. Registers and spilled bytes "
        "from cuobjdump, shared memory per block, MMA instructions in the PTX, SASS instructions per iteration of "
        "the cheapest inner loop (the unmasked steady state) beside the minimal FlashAttention-2 loop compiled at "
        "the same config from the same tensors, and the SASS count of every inner loop of the kernel.\n\n"
        "## Summary (quoted by docs/kernels.md)\n\n" + summary(rows) + "\n\n## Every compile\n\n"
        + markdown(rows) + "\n")
    return jpath, mpath


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="every scenario, dtype (bf16/fp16/fp32), sm_90 and sm_80")
    parser.add_argument("--write", action="store_true", help=f"write static_budget.json/.md to {RESULTS}")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--jobs", type=int, default=2, help="compiles in flight")
    parser.add_argument("--ops", nargs="+", default=["attention", "cat_head"], choices=["attention", "cat_head"])
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="rewrite static_budget.md (and .json) in --out from an existing table, compiling nothing")
    args = parser.parse_args(argv)
    if args.render:
        table = json.loads(args.render.read_text())
        rows = [Row(**r) for r in table.pop("rows")]
        for path in write(rows, args.out, table["set"] == "full", meta=table):
            print(f"wrote {path}")
        return 0
    rows = collect(args.full, args.jobs, tuple(args.ops))
    print(markdown(rows))
    if args.write:
        for path in write(rows, args.out, args.full):
            print(f"wrote {path}")
    bad = violations(rows)
    for line in bad:
        print("BUDGET:", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
