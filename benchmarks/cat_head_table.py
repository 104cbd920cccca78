"""Speed and peak memory of the fused CAT head loss against its peers; one table + a JSON file.

    python benchmarks/cat_head_table.py            # GPU: B x C grid at d=512, bf16
    python benchmarks/cat_head_table.py --smoke    # CPU, Triton interpreter, tiny shapes, seconds

Implementations (all compute the full DePT loss, (1-lam) CE(z_ITM) + lam CE(z_CAT) over 2B rows):
  triton   fastprompt.kernels.cat_head.cat_head_loss (5 launches, no host sync: labels and the scale
           are checked on the device)
  triton_checked  the same with cat_head.CHECK_VALUES = True (the host-side value checks: one sync)
  eager    fastprompt.kernels.reference.cat_head_loss (the spec, with the same validation)
  compile  torch.compile(fullgraph=True) of the reference's maths without the data-dependent
           checks (they would break the graph)
  liger    Liger-Kernel's fused linear cross-entropy for the CAT part (transform in PyTorch),
           the ITM part in eager PyTorch; only where liger_kernel imports and a GPU runs.
           Liger computes its gradients inside the forward, so its 'forward' includes them.
Modes: forward (autograd graph recorded, as in training), backward alone (graphs retained), both.
Medians of triton.testing.do_bench on a GPU (CUDA events), of host timings in smoke mode; inputs
rotate among 4 sets so repeated calls do not just re-read one buffer from cache.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# Triton reads TRITON_INTERPRET at import: decide before anything imports it.
if shutil.which("nvidia-smi") is None and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastprompt.kernels import cat_head, reference  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helper beside this script, however it is loaded
from table_common import Rotation, median_ms_host, parse_table_args, publish, run_header  # noqa: E402

GPU_BATCHES = (4, 32, 256, 1024)
GPU_CLASSES = (5, 51, 500, 1000)
GPU_DIM = 512
SMOKE_SHAPES = ((4, 5), (9, 51))
SMOKE_DIM = 32
LAM = 0.7
SCALE = 100.0
ROTATE = 4
MODES = ("forward", "backward", "both")
PARAM_NAMES = ("gamma_img", "beta_img", "gamma_txt", "beta_txt", "weight", "bias")

PEER_NOTES = {
    "triton": "fastprompt.kernels.cat_head.cat_head_loss (fused Triton, 5 launches fwd+bwd, no host sync)",
    "triton_checked": "the same with cat_head.CHECK_VALUES = True (host-side value checks, one sync per call)",
    "eager": "fastprompt.kernels.reference.cat_head_loss (plain PyTorch spec, fp32 compute, value checks)",
    "compile": "torch.compile(fullgraph=True) of the reference maths without data-dependent checks (fp32 compute, like eager)",
    "liger": "Liger-Kernel LigerFusedLinearCrossEntropyLoss for the CAT part + eager ITM; grads computed in forward",
}


def make_inputs(b, c, d, *, dtype, device, seed):
    """Leaf tensors requiring grad: raw features, DePT's head parameters; labels."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=g) * scale + shift
        return t.to(device=device, dtype=dtype).requires_grad_()

    return {
        "image_features": rand(b, d, scale=0.5),
        "text_features": rand(c, d, scale=0.5),
        "labels": torch.randint(0, c, (b,), generator=g).to(device),
        "gamma_img": rand(d, scale=0.1, shift=1.0),
        "beta_img": rand(d, scale=0.1),
        "gamma_txt": rand(d, scale=0.1, shift=1.0),
        "beta_txt": rand(d, scale=0.1),
        "weight": rand(c, d, scale=d ** -0.5),
        "bias": rand(c, scale=0.1),
    }


def leaves(inputs):
    return [v for k, v in inputs.items() if k != "labels"]


def _call(fn, x):
    return fn(x["image_features"], x["text_features"], x["labels"], **{k: x[k] for k in PARAM_NAMES},
              logit_scale=SCALE, lam=LAM)


def _unchecked_reference_loss(image_features, text_features, labels, *, gamma_img, beta_img, gamma_txt, beta_txt,
                              weight, bias, logit_scale, lam):
    """reference.cat_head_loss's maths (fp32 compute) without its validation, so dynamo keeps one graph."""
    f_i, f_t = image_features.float(), text_features.float()
    z_itm = reference.itm_logits(f_i, f_t, logit_scale)
    g = torch.cat([gamma_txt.float() * f_t[labels] + beta_txt.float(), gamma_img.float() * f_i + beta_img.float()])
    z_cat = F.linear(g, weight.float(), bias.float())
    both = torch.cat([labels, labels])
    return (1 - lam) * F.cross_entropy(z_itm, labels) + lam * F.cross_entropy(z_cat, both)


def _liger_loss_factory():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    flce = LigerFusedLinearCrossEntropyLoss()

    def liger_loss(image_features, text_features, labels, *, gamma_img, beta_img, gamma_txt, beta_txt,
                   weight, bias, logit_scale, lam):
        g = torch.cat([gamma_txt * text_features[labels] + beta_txt, gamma_img * image_features + beta_img])
        z_itm = reference.itm_logits(image_features.float(), text_features.float(), logit_scale)
        return (1 - lam) * F.cross_entropy(z_itm, labels) + lam * flce(weight, g, torch.cat([labels, labels]), bias)

    return liger_loss


def _triton_with_host_checks(*args, **kwargs):
    previous, cat_head.CHECK_VALUES = cat_head.CHECK_VALUES, True
    try:
        return cat_head.cat_head_loss(*args, **kwargs)
    finally:
        cat_head.CHECK_VALUES = previous


def implementations(device: torch.device, smoke: bool):
    """name -> loss function with the reference's signature; peers that cannot run here are left out."""
    impls = {"triton": cat_head.cat_head_loss, "triton_checked": _triton_with_host_checks,
             "eager": reference.cat_head_loss}
    if smoke or device.type != "cuda":
        return impls, {"compile": "skipped in smoke mode (minutes of compilation on a CPU)",
                       "liger": "needs a GPU"}
    skipped = {}
    impls["compile"] = torch.compile(_unchecked_reference_loss, fullgraph=True)
    try:
        impls["liger"] = _liger_loss_factory()
    except Exception as exc:  # not installed, or an API change: say so in the JSON
        skipped["liger"] = f"unavailable: {type(exc).__name__}: {exc}"
    return impls, skipped


def time_impl(fn, sets, device: torch.device, smoke: bool):
    """Median ms for forward / backward / both, and peak extra memory (MiB, GPU) of one forward+backward."""
    all_leaves = [t for x in sets for t in leaves(x)]

    def clear_grads():
        for t in all_leaves:
            t.grad = None

    rot = Rotation(sets)
    modes = {
        "forward": lambda: _call(fn, rot.next()),
        "both": lambda: _call(fn, rot.next()).backward(),
    }
    losses = Rotation([_call(fn, x) for x in sets])
    modes["backward"] = lambda: losses.next().backward(retain_graph=True)

    result = {}
    for mode in MODES:
        try:
            if device.type == "cuda":
                import triton.testing

                result[f"{mode}_ms"] = triton.testing.do_bench(
                    modes[mode], warmup=25, rep=100, grad_to_none=all_leaves, return_mode="median"
                )
            else:
                result[f"{mode}_ms"] = median_ms_host(lambda: (clear_grads(), modes[mode]()), reps=5 if smoke else 10)
        except Exception as exc:
            result[f"{mode}_ms"] = None
            result[f"{mode}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    clear_grads()
    if device.type == "cuda":
        del losses
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _call(fn, sets[0]).backward()
        torch.cuda.synchronize()
        result["peak_mem_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        clear_grads()
    else:
        result["peak_mem_mib"] = None
    return result


def run(smoke: bool, device: torch.device):
    dtype = torch.bfloat16
    if smoke:
        shapes, d = SMOKE_SHAPES, SMOKE_DIM
    else:
        shapes, d = [(b, c) for b in GPU_BATCHES for c in GPU_CLASSES], GPU_DIM
    impls, skipped = implementations(device, smoke)
    rows = []
    for b, c in shapes:
        sets = [make_inputs(b, c, d, dtype=dtype, device=device, seed=1000 * b + c + i) for i in range(ROTATE)]
        for name, fn in impls.items():
            rows.append({"B": b, "C": c, "d": d, "impl": name, **time_impl(fn, sets, device, smoke)})
    return rows, skipped, d, dtype


def format_table(rows) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    by_shape = {}
    for r in rows:
        by_shape.setdefault((r["B"], r["C"]), {})[r["impl"]] = r

    def ms(v):
        return "   -   " if v is None else f"{v:7.3f}"

    header = f"{'B':>5} {'C':>5} " + " ".join(f"{n + ' fwd/bwd/both ms':>30} {'MiB':>6}" for n in impls)
    speed_cols = [n for n in impls if not n.startswith("triton")]
    header += "".join(f" {'x vs ' + n:>11}" for n in speed_cols)
    lines = [header, "-" * len(header)]
    for (b, c), per in by_shape.items():
        cells = []
        for n in impls:
            r = per.get(n, {})
            mem = r.get("peak_mem_mib")
            cells.append(f"{ms(r.get('forward_ms'))} {ms(r.get('backward_ms'))} {ms(r.get('both_ms'))}"
                         f"       {'  -   ' if mem is None else f'{mem:6.1f}'}")
        ours = per.get("triton", {}).get("both_ms")
        for n in speed_cols:
            theirs = per.get(n, {}).get("both_ms")
            cells.append(f"{theirs / ours:10.2f}x" if ours and theirs else f"{'-':>11}")
        lines.append(f"{b:>5} {c:>5} " + " ".join(cells))
    lines.append("x vs peer: peer's forward+backward time over ours (higher is better for the fused kernel)")
    return "\n".join(lines)


def main(argv=None) -> Path:
    args, device = parse_table_args(__doc__, argv)
    rows, skipped, d, dtype = run(args.smoke, device)
    report = {
        **run_header("cat_head_loss", device, args.smoke),
        "dtype": str(dtype),
        "d": d,
        "lam": LAM,
        "logit_scale": SCALE,
        "peers": {k: v for k, v in PEER_NOTES.items() if any(r["impl"] == k for r in rows)},
        "skipped_peers": skipped,
        "timing": "median ms; do_bench (CUDA events, 25 ms warm-up, 100 ms runs)" if device.type == "cuda"
                  else "median ms of host timings (5 runs after two warm-ups)",
        "rows": rows,
    }
    return publish(report, args, device, f"{dtype}, d={d}, lam={LAM}", format_table(rows), skipped)


if __name__ == "__main__":
    main()
