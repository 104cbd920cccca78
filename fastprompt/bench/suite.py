"""`fastprompt bench train`: training throughput of every method, fastprompt's path against the
official-style path (fastprompt.official), measured in the same process on the same device.

Per configuration (method x batch x classes x style) it reports images/s over whole steps, a
step-time breakdown (data, image encoder, text encoder, head, backward, optimiser), peak device
memory, the model FLOPs a step needs and the MFU they give against the device's bf16 matmul rate
measured in the same run (fastprompt.bench.steps). `run` adds whole base-to-new runs of both
styles on a synthetic ImageFolder (fastprompt.bench.runs); `max_batch` finds the largest batch that
fits and `vision_mfu` times the prompted image encoder alone (fastprompt.bench.capacity). The JSON
and a PNG chart go to `out`. The command-line parser is fastprompt.cli's.
"""
from __future__ import annotations

import datetime
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..clip import load_clip
from ..errors import ConfigError
from ..methods import METHOD_NAMES
from ..official import official_clip
from ..config import TrainConfig
from ..training import resolve_device
from .capacity import largest_batch, vision_mfu
from .report import draw_bench_chart, load_bench_result, markdown_table, one_line, speedups
from .runs import whole_run
from .steps import bench_step, precompute_comparison, precompute_line
from .stepper import STYLES
from .synthetic import write_synthetic_tree
from .timing import environment, measure_matmul_rate, reset_memory

__all__ = ["GPU_GRID", "SMOKE_GRID", "BenchOptions", "run_bench", "redraw"]

BASE_METHODS = ("coop", "cocoop", "kgcoop", "maple", "dpl")
ALL_METHODS = tuple(m for base in BASE_METHODS for m in (base, f"dept+{base}"))
GPU_GRID = {"model": "ViT-B-16", "methods": ALL_METHODS, "batches": (4, 32, 128), "classes": (50, 500, 1000),
            "steps": 20, "warmup": 3, "feature_batch": 512, "text_chunk_size": 4096, "num_workers": 8, "repeats": 3}
SMOKE_GRID = {"model": "fastprompt-tiny", "methods": ("coop", "dept+coop"), "batches": (4,), "classes": (5,),
              "steps": 2, "warmup": 1, "feature_batch": 8, "text_chunk_size": None, "num_workers": 0, "repeats": 1}


@dataclass
class BenchOptions:
    """What to measure (the `fastprompt bench train` options; None: the grid's default)."""

    smoke: bool = False  # CPU smoke mode: fastprompt-tiny, 2 steps, coop and dept+coop
    out: str = "benchmarks/results"
    model: Optional[str] = None
    methods: Optional[list[str]] = None
    batches: Optional[list[int]] = None
    classes: Optional[list[int]] = None
    styles: list[str] = field(default_factory=lambda: list(STYLES))
    steps: Optional[int] = None
    repeats: Optional[int] = None  # measured passes per configuration (the median is reported)
    compile: bool = False
    cuda_graphs: bool = False
    text_chunk_size: Optional[int] = None
    device: str = "auto"
    no_steps: bool = False  # skip the per-step grid
    run: Optional[list[str]] = None  # whole base-to-new runs of these methods ([]: the default two)
    run_classes: Optional[int] = None
    run_shots: Optional[int] = None
    run_epochs: Optional[int] = None
    run_test_per_class: Optional[int] = None
    max_batch: Optional[list[str]] = None  # largest batch of these methods ([]: the default two)
    vision_mfu: Optional[list[str]] = None  # prompted image encoder alone ([]: maple and dpl)
    precompute: Optional[list[str]] = None  # fast steps with and without precomputed features ([]: coop)
    feature_batch: Optional[int] = None  # images per no-grad feature batch (train.feature_batch_size)


def guarded(smoke: bool, record: dict, fn: Callable, *args, **kwargs) -> dict:
    """fn's record; on a GPU run an unexpected error is recorded and the run goes on (one broken
    configuration must not lose an hour of measurements). The smoke mode (CI) raises it."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - recorded in the JSON, with its type
        if smoke:
            raise
        reset_memory(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        return {**record, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}


def run_bench(opts: BenchOptions) -> Path:
    """Measure what `opts` asks for; writes the JSON (and chart) under opts.out and returns its path."""
    grid = dict(SMOKE_GRID if opts.smoke else GPU_GRID)
    device = torch.device("cpu") if opts.smoke and opts.device == "auto" else resolve_device(opts.device)
    model = opts.model or grid["model"]
    methods = opts.methods or list(grid["methods"])
    batches, classes = opts.batches or list(grid["batches"]), opts.classes or list(grid["classes"])
    steps = opts.steps or grid["steps"]
    repeats = opts.repeats or grid["repeats"]
    chunk = opts.text_chunk_size if opts.text_chunk_size is not None else grid["text_chunk_size"]
    feature_batch = opts.feature_batch or grid["feature_batch"]
    bad = [m for m in methods if m not in METHOD_NAMES]
    if bad:
        raise ConfigError(f"unknown method(s) {bad}; choose from {', '.join(METHOD_NAMES)}")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    matmul = measure_matmul_rate(device, smoke=opts.smoke)
    config = {"model": model, "pretrained": None, "mode": "smoke" if opts.smoke else "full", "methods": methods,
              "batches": batches, "classes": classes, "styles": opts.styles, "steps": steps, "warmup": grid["warmup"],
              "feature_batch": feature_batch, "text_chunk_size": chunk,
              # the grid's fast style precomputes as training does by default (train.precompute_features)
              "precompute_features": TrainConfig().precompute_features, "compile": opts.compile,
              "cuda_graphs": opts.cuda_graphs,
              "num_workers": grid["num_workers"], "image_size": None, "repeats": repeats,
              "statistic": "median over `repeats` passes of each pass's mean step time"}
    results = {"benchmark": "train", "environment": environment(device, matmul), "config": config, "steps": []}
    torch.manual_seed(0)
    clips = {}

    def clip_for(style):
        if style not in clips:
            torch.manual_seed(0)
            clips[style] = (official_clip(model, None, device) if style == "official"
                            else load_clip(model, None, dtype=torch.float32, device=device))
        return clips[style]

    config["image_size"] = clip_for("fast").image_size
    if not opts.no_steps:
        for method in methods:
            for b in batches:
                for c in classes:
                    flops = None
                    for style in opts.styles:
                        rec = guarded(opts.smoke, {"method": method, "batch": b, "classes": c, "style": style},
                                      bench_step, clip_for(style), method, b, c, style, device=device, steps=steps,
                                      warmup=grid["warmup"], feature_batch=feature_batch,
                                      text_chunk_size=chunk, compile=opts.compile, cuda_graphs=opts.cuda_graphs,
                                      num_workers=grid["num_workers"], flops=flops, peak_rate=matmul["flops_per_s"],
                                      repeats=repeats, precompute=config["precompute_features"])
                        flops = rec.get("model_flops_per_step", flops)
                        results["steps"].append(rec)
                        print(one_line(rec), flush=True)
        results["speedups"] = speedups(results["steps"])
    if opts.run is not None:
        clips.clear()  # each run loads its own backbone; free the grid's before measuring peak memory
        results["whole_runs"] = whole_runs(opts, model, device, chunk)
    if opts.vision_mfu is not None:
        batch = max(batches)
        results["vision_mfu"] = []
        for method in opts.vision_mfu or ["maple", "dpl"]:
            rec = guarded(opts.smoke, {"method": method, "batch": batch}, vision_mfu, clip_for("fast"), method, batch,
                          device=device, steps=steps, peak_rate=matmul["flops_per_s"])
            results["vision_mfu"].append(rec)
            print(f"vision forward+backward {method} B={batch}: MFU {rec.get('mfu', rec.get('error'))}", flush=True)
    if opts.precompute is not None:
        results["precompute"] = [
            guarded(opts.smoke, {"method": method, "batch": b, "classes": c}, precompute_comparison, clip_for("fast"),
                    method, b, c, device=device, steps=steps, warmup=grid["warmup"], feature_batch=feature_batch,
                    text_chunk_size=chunk, num_workers=grid["num_workers"], repeats=repeats)
            for method in opts.precompute or ["coop"] for b in batches for c in classes]
        for rec in results["precompute"]:
            print(precompute_line(rec), flush=True)
    if opts.max_batch is not None:
        results["largest_batch"] = []
        for method in opts.max_batch or ["dept+coop", "dept+maple"]:
            for style in opts.styles:
                rec = guarded(opts.smoke, {"method": method, "classes": max(classes), "style": style},
                              largest_batch, clip_for(style), method, max(classes), style, device=device,
                              feature_batch=feature_batch, text_chunk_size=chunk,
                              limit=8 if opts.smoke else 4096, num_workers=grid["num_workers"])
                results["largest_batch"].append(rec)
                print(f"largest batch {method} {style} C={max(classes)}: {rec.get('largest_batch', rec.get('error'))}",
                      flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    tag = "smoke" if opts.smoke else results["environment"]["device"].replace(" ", "_")
    path = out / f"train_{tag}_{stamp}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    if results["steps"]:
        chart = draw_bench_chart(results, path.with_suffix(".png"))
        print(f"wrote {path} and {chart}")
    else:
        print(f"wrote {path}")
    print(markdown_table(results))
    return path


def whole_runs(opts: BenchOptions, model: str, device: torch.device, chunk: Optional[int]) -> list[dict]:
    """Whole base-to-new runs of opts.run in every style, on a synthetic ImageFolder written for them."""
    smoke = opts.smoke
    classes = opts.run_classes or (3 if smoke else 500)
    shots = opts.run_shots or (2 if smoke else 16)
    epochs = opts.run_epochs or (1 if smoke else 10)
    tests = opts.run_test_per_class or (2 if smoke else 50)
    workers = 0 if smoke else GPU_GRID["num_workers"]
    methods = opts.run or ["dept+coop", "dept+maple"]
    runs = []
    with tempfile.TemporaryDirectory(prefix="fastprompt-bench-") as tmp:
        tmp = Path(tmp)
        size = load_clip(model, None).image_size
        # Base and new are the two halves of the class list (base-to-new), so 2x classes in the tree.
        root = write_synthetic_tree(tmp / "data", 2 * classes, shots, tests, size)
        for method in methods:
            for style in opts.styles:
                rec = guarded(smoke, {"style": style, "method": method}, whole_run, style, method, data_root=root,
                              out=tmp / f"{style}_{method.replace('+', '_')}", model=model, device=device,
                              shots=shots, epochs=epochs, batch=4, num_workers=workers, compile=opts.compile,
                              text_chunk_size=chunk,
                              # one cache per (method, style): no run may find another's test features
                              feature_cache_dir=tmp / "cache" / f"{style}_{method.replace('+', '_')}")
                rec.update(base_classes=classes, shots=shots, epochs=epochs, test_per_class=tests, batch=4,
                           train_images=classes * shots, test_images=2 * classes * tests)
                if "seconds" in rec:
                    # Whole-run throughput: every image the run processed (training views, test images) per second.
                    rec["images_per_s"] = (epochs * rec["train_images"] + rec["test_images"]) / rec["seconds"]
                runs.append(rec)
                print(f"whole run {method} {style}: {rec.get('seconds', rec.get('error'))}", flush=True)
    return runs


def redraw(result_json: str | Path, out: Optional[str | Path] = None) -> tuple[str, Path]:
    """`fastprompt bench report RESULT.json`: the table, and the chart drawn again (next to the JSON
    by default)."""
    results = load_bench_result(result_json)
    chart = draw_bench_chart(results, Path(out) if out else Path(result_json).with_suffix(".png"))
    return markdown_table(results), chart
