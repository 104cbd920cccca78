"""Speed of the fused decoupled attention against its peers; prints one table, writes one JSON file.

    python benchmarks/decoupled_attention_table.py            # GPU: CLIP shapes, bf16
    python benchmarks/decoupled_attention_table.py --smoke    # CPU, Triton interpreter, tiny shapes, seconds
    python benchmarks/decoupled_attention_table.py --cpu      # CPU, no Triton: the paths a CPU runs, timed

Shapes (prompts right after CLS/SOS, prompt_start=1, n_p in {4, 16}):
  vision  ViT-B/16: B=256 images, H=12, N=197+n_p, D=64, no mask
  text    C=1000 class prompts as the batch, H=8, N=77, D=64, causal, prompt rows see all
--cpu: vision B=8 and text C=50 at the same H, N, D, float32, on the CPU: sdpa_segments (what
`auto` and `sdpa` run there) against the eager op and plain SDPA (valid CPU figures: same machine,
same run; the Triton rows are GPU-only). One thread, timed by this process's CPU time
(time.process_time), so other jobs on a shared machine do not move the figures.
Rules: exact/exact (standard attention: the fair comparison with SDPA) and fixed/exact (DPL's
default: instance rows fixed c=0.1, prompt rows exact).
Implementations:
  triton   fastprompt.kernels.decoupled_attention on q, k, v [B, H, N, D] (the fused kernels, or SDPA
           where the rules make the decomposition the identity: exact/exact without see-all)
  triton_qkv_bf  decoupled_attention_qkv on the packed projection [B, N, 3E] -> [B, N, E] (batch-first:
           fastprompt's encoders, open_clip blocks)
  triton_qkv_sf  the same on [N, B, 3E] -> [N, B, E] (sequence-first: OpenAI CLIP's blocks as the
           research codebases vendor them, i.e. what swap_attention runs there)
  sdpa_segments  fastprompt.kernels.decoupled_attention_sdpa: the decomposition from fused SDPA calls
           per row group and key segment (the path without Triton; no score matrix)
  eager    fastprompt.kernels.reference.decoupled_attention (the spec; materialises the scores)
  flex     two flex_attention(..., return_lse) calls (prompt keys / instance keys, block masks)
           mixed in PyTorch, torch.compile(fullgraph=True)
  sdpa     F.scaled_dot_product_attention, same shape, causal where the text is (not decoupled:
           the cost of standard attention, the floor to reach)
  xformers memory_efficient_attention, same shape (standard attention), where it imports
Modes: forward (inputs require grad, as in training), backward alone (graphs retained), both.
Metrics: median ms (triton.testing.do_bench, CUDA events; host clock in smoke mode), achieved
GB/s over the minimum bytes (forward: Q, K, V read and O written once; backward: Q, K, V, dO
read and dQ, dK, dV written once), TFLOP/s over the visible score entries (forward 4 D per entry,
backward 2.5x that), the peers' time over ours, and the measured device-to-device copy bandwidth.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

# Triton reads TRITON_INTERPRET at import: decide before anything imports it.
if shutil.which("nvidia-smi") is None and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastprompt.kernels import reference  # noqa: E402
from fastprompt.kernels.decoupled_attention import decoupled_attention as fused_decoupled_attention  # noqa: E402
from fastprompt.kernels.decoupled_attention import decoupled_attention_qkv as fused_decoupled_attention_qkv  # noqa: E402
from fastprompt.kernels.decoupled_attention_sdpa import decoupled_attention_sdpa  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helper beside this script, however it is loaded
from table_common import Rotation, median_ms_host, parse_table_args, publish, run_header  # noqa: E402

MODES = ("forward", "backward", "both")
ROTATE = 2
FIXED_C = 0.1
RULES = ("exact/exact", "fixed/exact")
# name, B, H, N, D, prompt_start, num_prompts, causal, prompt_rows_see_all
GPU_SHAPES = [
    *[(f"vision n_p={p}", 256, 12, 197 + p, 64, 1, p, False, False) for p in (4, 16)],
    *[(f"text n_p={p}", 1000, 8, 77, 64, 1, p, True, True) for p in (4, 16)],
]
SMOKE_SHAPES = [
    ("vision-like smoke", 1, 2, 17 + 4, 16, 1, 4, False, False),
    ("text-like smoke", 2, 2, 13, 16, 1, 4, True, True),
]
CPU_SHAPES = [
    *[(f"vision n_p={p}", 8, 12, 197 + p, 64, 1, p, False, False) for p in (4, 16)],
    *[(f"text n_p={p}", 50, 8, 77, 64, 1, p, True, True) for p in (4, 16)],
]
PEER_NOTES = {
    "triton": "fastprompt.kernels.decoupled_attention on [B, H, N, D] (fused Triton forward/backward; SDPA "
              "where the decomposition is the identity)",
    "triton_qkv_bf": "decoupled_attention_qkv, packed batch-first [B, N, 3E] -> [B, N, E] (no layout copy)",
    "triton_qkv_sf": "decoupled_attention_qkv, packed sequence-first [N, B, 3E] -> [N, B, E] (OpenAI CLIP layout; "
                     "what swap_attention runs in CoOp/MaPLe/DePT codebases)",
    "sdpa_segments": "fastprompt.kernels.decoupled_attention_sdpa (fused SDPA calls per row group and key segment, "
                     "mixed in PyTorch; no Triton, no score matrix)",
    "eager": "fastprompt.kernels.reference.decoupled_attention (plain PyTorch spec, fp32 compute)",
    "flex": "two flex_attention(return_lse) calls (prompt / instance block masks) mixed in PyTorch, "
            "torch.compile(fullgraph=True)",
    "sdpa": "F.scaled_dot_product_attention, same shape (standard attention, not decoupled)",
    "xformers": "xformers.ops.memory_efficient_attention, same shape (standard attention, [B, N, H, D] layout)",
}


def rule_kwargs(rules: str) -> dict:
    instance_mix, prompt_mix = rules.split("/")
    return dict(instance_mix=instance_mix, prompt_mix=prompt_mix,
                instance_weight=FIXED_C if instance_mix == "fixed" else None,
                prompt_weight=FIXED_C if prompt_mix == "fixed" else None)


def flex_composition(n, prompt_start, num_prompts, causal, see_all, rules, device, compile_it=True):
    """(q, k, v) -> out: decoupled attention from two flex_attention calls and PyTorch mixing."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    prompt_end = prompt_start + num_prompts

    def visible(q_idx, kv_idx):
        ok = kv_idx <= q_idx if causal else kv_idx >= 0
        if causal and see_all:
            ok = ok | ((q_idx >= prompt_start) & (q_idx < prompt_end))
        return ok

    def prompt_keys(b, h, q_idx, kv_idx):
        return visible(q_idx, kv_idx) & (kv_idx >= prompt_start) & (kv_idx < prompt_end)

    def instance_keys(b, h, q_idx, kv_idx):
        return visible(q_idx, kv_idx) & ((kv_idx < prompt_start) | (kv_idx >= prompt_end))

    block_p = create_block_mask(prompt_keys, None, None, n, n, device=device)
    block_x = create_block_mask(instance_keys, None, None, n, n, device=device)
    kw = rule_kwargs(rules)
    is_prompt_row = torch.zeros(n, dtype=torch.bool, device=device)
    is_prompt_row[prompt_start:prompt_end] = True

    def composed(q, k, v):
        o_p, lse_p = flex_attention(q, k, v, block_mask=block_p, return_lse=True)
        o_x, lse_x = flex_attention(q, k, v, block_mask=block_x, return_lse=True)
        lse_p, lse_x = lse_p.float(), lse_x.float()
        has_p, has_x = torch.isfinite(lse_p), torch.isfinite(lse_x)
        w_x = reference.mix_weight(kw["instance_mix"], kw["instance_weight"], lse_p, lse_x, has_p, has_x)
        w_p = reference.mix_weight(kw["prompt_mix"], kw["prompt_weight"], lse_p, lse_x, has_p, has_x)
        w = torch.where(is_prompt_row.view(1, 1, n), w_p, w_x).unsqueeze(-1)
        return ((1 - w) * o_x.float() + w * o_p.float()).to(q.dtype)

    return torch.compile(composed, fullgraph=True) if compile_it else composed


def implementations(shape, rules, device, smoke, cpu=False):
    """name -> fn(q, k, v) -> out for one shape and rule pair, plus {peer: why it is missing}."""
    _, b, h, n, d, start, num_prompts, causal, see_all = shape
    kw = dict(prompt_start=start, num_prompts=num_prompts, causal=causal, prompt_rows_see_all=see_all,
              **rule_kwargs(rules))
    segments = lambda q, k, v: decoupled_attention_sdpa(q, k, v, **kw)  # noqa: E731
    if cpu:
        return {"sdpa_segments": segments, "eager": lambda q, k, v: reference.decoupled_attention(q, k, v, **kw),
                "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}, {
                    name: "GPU only" for name in ("triton", "triton_qkv_bf", "triton_qkv_sf", "flex", "xformers")}
    impls = {
        "triton": lambda q, k, v: fused_decoupled_attention(q, k, v, **kw),
        "triton_qkv_bf": ("qkv_bf", lambda qkv: fused_decoupled_attention_qkv(qkv, num_heads=h, **kw)),
        "triton_qkv_sf": ("qkv_sf", lambda qkv: fused_decoupled_attention_qkv(qkv, num_heads=h, seq_first=True, **kw)),
        "sdpa_segments": segments,
        "eager": lambda q, k, v: reference.decoupled_attention(q, k, v, **kw),
    }
    if smoke or device.type != "cuda":
        return impls, {"flex": "GPU only (compilation takes minutes on a CPU)", "sdpa": "GPU only",
                       "xformers": "GPU only"}
    skipped = {}
    try:
        impls["flex"] = flex_composition(n, start, num_prompts, causal, see_all, rules, device)
    except Exception as exc:
        skipped["flex"] = f"unavailable: {type(exc).__name__}: {exc}"[:300]
    impls["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    try:
        import xformers.ops as xops

        bias = xops.LowerTriangularMask() if causal else None
        # xformers wants [B, N, H, D]: give it that layout (made once per input set, outside the timing).
        impls["xformers"] = ("bnhd", lambda q, k, v: xops.memory_efficient_attention(q, k, v, attn_bias=bias))
    except Exception as exc:
        skipped["xformers"] = f"unavailable: {type(exc).__name__}: {exc}"[:300]
    return impls, skipped


def make_inputs(shape, dtype, device, seed, layout="bhnd"):
    """(leaves, dout): q, k, v in [B, H, N, D] ("bhnd") or [B, N, H, D] ("bnhd"), or one packed
    projection [B, N, 3E] ("qkv_bf") / [N, B, 3E] ("qkv_sf") with dout in the output's layout."""
    _, b, h, n, d, *_ = shape
    g = torch.Generator().manual_seed(seed)

    def rand(*dims):
        return torch.randn(dims, generator=g).to(device=device, dtype=dtype)

    if layout in ("qkv_bf", "qkv_sf"):
        lead = (b, n) if layout == "qkv_bf" else (n, b)
        return [rand(*lead, 3 * h * d).requires_grad_()], rand(*lead, h * d)
    dims = (b, h, n, d) if layout == "bhnd" else (b, n, h, d)
    q, k, v, dout = (rand(*dims) for _ in range(4))
    return [q.requires_grad_(), k.requires_grad_(), v.requires_grad_()], dout


def time_impl(fn, sets, device, smoke, clock=time.perf_counter):
    """Median ms of forward / backward / both over rotating input sets."""
    leaves = [t for qkv, _ in sets for t in qkv]

    def clear():
        for t in leaves:
            t.grad = None

    rot = Rotation(sets)

    def forward():
        qkv, _ = rot.next()
        return fn(*qkv)

    def both():
        qkv, dout = rot.next()
        fn(*qkv).backward(dout)

    graphs = None

    def backward():
        out, dout = graphs.next()
        out.backward(dout, retain_graph=True)

    steps = {"forward": forward, "backward": backward, "both": both}
    result = {}
    for mode in MODES:
        try:
            if mode == "backward":  # graphs recorded once, inside the try: a failing peer only loses its row
                graphs = Rotation([(fn(*qkv), dout) for qkv, dout in sets])
            if device.type == "cuda":
                import triton.testing

                result[f"{mode}_ms"] = triton.testing.do_bench(steps[mode], warmup=25, rep=100, grad_to_none=leaves,
                                                               return_mode="median")
            else:
                result[f"{mode}_ms"] = median_ms_host(lambda: (clear(), steps[mode]()), reps=3 if smoke else 10,
                                                      clock=clock)
        except Exception as exc:  # a peer that cannot run a mode: say why in the JSON
            result[f"{mode}_ms"] = None
            result[f"{mode}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    graphs = None
    clear()
    return result


def visible_entries(n, start, num_prompts, causal, see_all) -> int:
    """Score entries (i, j) the mask lets through, per batch x head."""
    if not causal:
        return n * n
    lower = n * (n + 1) // 2
    if see_all and num_prompts:
        # prompt rows see all n keys instead of i + 1
        lower += sum(n - (i + 1) for i in range(start, start + num_prompts))
    return lower


def work(shape, dtype):
    """(bytes, flops) per mode at the minimum: each tensor moved once; the visible score entries."""
    _, b, h, n, d, start, num_prompts, causal, see_all = shape
    tensor = b * h * n * d * torch.finfo(dtype).bits // 8
    fwd_flops = 4 * d * b * h * visible_entries(n, start, num_prompts, causal, see_all)
    return {
        "forward": (4 * tensor, fwd_flops),
        "backward": (7 * tensor, 2.5 * fwd_flops),
        "both": (11 * tensor, 3.5 * fwd_flops),
    }


def copy_bandwidth_gbs(device) -> float | None:
    """Device-to-device copy of 1 GiB: bytes read + written over the median time."""
    if device.type != "cuda":
        return None
    import triton.testing

    src = torch.empty(2**30, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    del src, dst
    return 2 * 2**30 / (ms * 1e-3) / 1e9


def run(smoke, device, dtype, cpu=False):
    shapes = SMOKE_SHAPES if smoke else CPU_SHAPES if cpu else GPU_SHAPES
    ours_name = "sdpa_segments" if cpu else "triton"  # what `auto` runs on this device
    rows, skipped_all = [], {}
    for shape in shapes:
        for rules in RULES:
            impls, skipped = implementations(shape, rules, device, smoke, cpu)
            skipped_all.update(skipped)
            seeds = [1000 * i + 10 * shape[3] + shape[6] for i in range(ROTATE)]
            needed = {entry[0] if isinstance(entry, tuple) else "bhnd" for entry in impls.values()}
            sets = {layout: [make_inputs(shape, dtype, device, s, layout) for s in seeds] for layout in needed}
            for name, entry in impls.items():
                layout, fn = entry if isinstance(entry, tuple) else ("bhnd", entry)
                # SDPA and xformers compute standard attention: time them once per shape (exact rules).
                if name in ("sdpa", "xformers") and rules != RULES[0]:
                    continue
                timing = time_impl(fn, sets[layout], device, smoke, time.process_time if cpu else time.perf_counter)
                row = {"shape": shape[0], "B": shape[1], "H": shape[2], "N": shape[3], "D": shape[4],
                       "prompt_start": shape[5], "num_prompts": shape[6], "causal": shape[7],
                       "prompt_rows_see_all": shape[8], "rules": rules, "impl": name, **timing}
                for mode, (nbytes, flops) in work(shape, dtype).items():
                    ms = timing.get(f"{mode}_ms")
                    row[f"{mode}_GBps"] = nbytes / (ms * 1e-3) / 1e9 if ms else None
                    row[f"{mode}_TFLOPs"] = flops / (ms * 1e-3) / 1e12 if ms else None
                rows.append(row)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            del sets
    # Each row also carries its time relative to ours (peer time / our time, same shape, same mode):
    # the fused kernel's on a GPU, the SDPA segments' with --cpu.
    ours = {(r["shape"], r["rules"]): r for r in rows if r["impl"] == ours_name}
    for r in rows:
        base = ours.get((r["shape"], r["rules"])) or ours.get((r["shape"], RULES[0]))
        for mode in MODES:
            mine, theirs = base.get(f"{mode}_ms"), r.get(f"{mode}_ms")
            r[f"{mode}_peer_over_ours"] = theirs / mine if mine and theirs else None
    return rows, skipped_all


def format_table(rows, copy_gbs, ours="triton") -> str:
    def f(v, spec):
        return format(v, spec) if v is not None else "-"

    header = (f"{'shape':<17} {'rules':<12} {'impl':<13} {'fwd ms':>8} {'bwd ms':>8} {'both ms':>8} "
              f"{'fwd GB/s':>9} {'fwd TF/s':>9} {'both TF/s':>9} {'peer/ours both':>14}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['shape']:<17} {r['rules']:<12} {r['impl']:<13} {f(r['forward_ms'], '8.3f'):>8} "
            f"{f(r['backward_ms'], '8.3f'):>8} {f(r['both_ms'], '8.3f'):>8} {f(r['forward_GBps'], '9.1f'):>9} "
            f"{f(r['forward_TFLOPs'], '9.2f'):>9} {f(r['both_TFLOPs'], '9.2f'):>9} "
            f"{f(r['both_peer_over_ours'], '13.2f'):>13}x"
        )
    if any(r["impl"] == "sdpa_segments" for r in rows):
        lines.append("sdpa_segments bwd ms: a second backward through a retained graph rebuilds the op's inner graph "
                     "(a forward re-run), so read its `both` column")
    if copy_gbs:
        lines.append(f"measured device-to-device copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    lines.append(f"peer/ours: the implementation's forward+backward time over {ours}'s (higher = ours is faster);"
                 f" sdpa/xformers rows compare with {ours} exact/exact")
    return "\n".join(lines)


def main(argv=None) -> Path:
    args, device = parse_table_args(__doc__, argv, cpu_mode=True)
    # The interpreter has no bf16: the smoke mode runs float32 (and --cpu, as CPU training does).
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    copy_gbs = copy_bandwidth_gbs(device)
    threads = torch.get_num_threads()
    if args.cpu:
        torch.set_num_threads(1)  # with process-time timing: CPU work, not a share of a loaded machine
    try:
        rows, skipped = run(args.smoke, device, dtype, args.cpu)
    finally:
        torch.set_num_threads(threads)
    ours = "sdpa_segments" if args.cpu else "triton"
    report = {
        **run_header("decoupled_attention", device, args.smoke),
        "dtype": str(dtype),
        "fixed_c": FIXED_C,
        "copy_bandwidth_GBps": copy_gbs,
        "peers": {k: v for k, v in PEER_NOTES.items() if any(r["impl"] == k for r in rows)},
        "skipped_peers": skipped,
        "layouts": "triton/eager/flex/sdpa: q, k, v [B, H, N, D]; xformers [B, N, H, D]; triton_qkv_bf / "
                   "triton_qkv_sf: one packed projection [B, N, 3E] / [N, B, 3E] (the same bytes moved)",
        "timing": "median ms; do_bench (CUDA events, 25 ms warm-up, 100 ms runs)" if device.type == "cuda"
                  else "median ms of this process's CPU time on one thread (10 runs after two warm-ups)" if args.cpu
                  else "median ms of host timings (3 runs after two warm-ups)",
        "bytes": "forward 4, backward 7, both 11 tensors of B*H*N*D elements",
        "flops": "forward 4*D per visible score entry, backward 2.5x forward",
        "ours": ours,
        "rows": rows,
    }
    return publish(report, args, device, str(dtype), format_table(rows, copy_gbs, ours), skipped)


if __name__ == "__main__":
    main()
