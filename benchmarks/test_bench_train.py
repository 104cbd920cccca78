"""pytest-benchmark suite: one training step of every method, fastprompt's path vs the official style.

    pytest benchmarks/test_bench_train.py --benchmark-enable     # on a GPU: ViT-B/16, the full grid
Without a GPU it runs the smoke grid (fastprompt-tiny, coop and dept+coop, batch 4, 5 classes) on
the CPU; with the project's default --benchmark-disable each case runs once, as a test that the
suite works. `fastprompt bench train` is the same measurement with breakdown, MFU and a chart.
Fast-path steps on precomputed image features are timed over whole precompute cycles, so one
large no-grad image batch is amortised over the steps that use it.
"""
from __future__ import annotations

import pytest
import torch

from fastprompt import bench
from fastprompt.clip import load_clip
from fastprompt.official import official_clip

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
GRID = bench.GPU_GRID if CUDA else bench.SMOKE_GRID
_CLIPS: dict = {}


def _clip(style):
    if style not in _CLIPS:
        torch.manual_seed(0)
        _CLIPS[style] = (official_clip(GRID["model"], None, DEVICE) if style == "official"
                         else load_clip(GRID["model"], None, device=DEVICE))
    return _CLIPS[style]


@pytest.mark.parametrize("style", bench.STYLES)
@pytest.mark.parametrize("classes", GRID["classes"])
@pytest.mark.parametrize("batch", GRID["batches"])
@pytest.mark.parametrize("method", GRID["methods"])
def test_train_step(benchmark, method, batch, classes, style):
    try:
        stepper = bench.Stepper(style, _clip(style), method, batch, classes, device=DEVICE,
                                feature_batch=GRID["feature_batch"], text_chunk_size=GRID["text_chunk_size"],
                                num_workers=GRID["num_workers"])
        cycle = stepper.steps_per_cycle
        for _ in range(cycle):  # warm-up: kernels chosen, loader workers started
            stepper.step()
    except RuntimeError as err:
        if bench.is_oom(err):
            pytest.skip(f"{style} path out of memory at batch {batch}, {classes} classes")
        raise

    def step():
        loss = stepper.step()
        if CUDA:
            torch.cuda.synchronize()  # pytest-benchmark reads a host clock
        return loss

    benchmark.group = f"train step {GRID['model']} batch {batch} classes {classes}"
    benchmark.extra_info.update(method=method, batch=batch, classes=classes, style=style, images_per_call=batch,
                                steps_per_cycle=cycle, device=str(DEVICE))
    rounds = cycle * (2 if CUDA else 1)
    loss = benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    assert torch.isfinite(loss)  # the timed steps really trained on a finite loss
    del stepper
    bench.reset_memory(DEVICE)
