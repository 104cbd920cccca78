"""One configuration (method x batch x classes x style) of `fastprompt bench train`: images/s
over whole steps, the step-time breakdown, peak device memory, model FLOPs and MFU.

The breakdown is taken in its own eager pass, since wrapping the phases would break a compiled
graph; images/s comes from separate passes with the phase wrappers switched off (or, with compile,
a fresh compiled stepper without them). Backward is reported as one phase: autograd runs it as one
graph.
"""
from __future__ import annotations

import math
import statistics
from typing import Optional

import torch

from .stepper import Stepper, timed_steps
from .timing import PhaseClock, is_oom, peak_memory, reset_memory

__all__ = ["PASS_SECONDS", "bench_step", "precompute_comparison", "precompute_line"]

PASS_SECONDS = 5.0  # rough cap on one measured pass of a configuration


def bench_step(clip, method: str, batch: int, classes: int, style: str, *, device: torch.device, steps: int,
               warmup: int, feature_batch: int, text_chunk_size: Optional[int], compile: bool, num_workers: int,
               cuda_graphs: bool = False, flops: Optional[float] = None, peak_rate: Optional[float] = None,
               repeats: int = 3, precompute: bool = True) -> dict:
    """Throughput, breakdown, memory and MFU of one configuration; {'oom': True} if it does not fit.

    images/s and step_ms are the median over `repeats` passes of n steps (each pass's mean step)."""
    record = {"method": method, "batch": batch, "classes": classes, "style": style}
    stepper = None
    try:
        reset_memory(device)
        clock = PhaseClock(device)
        stepper = Stepper(style, clip, method, batch, classes, device=device, feature_batch=feature_batch,
                          text_chunk_size=text_chunk_size, compile=False, num_workers=num_workers, clock=clock,
                          precompute=precompute)
        cycle = stepper.steps_per_cycle
        warm = cycle * max(1, math.ceil(warmup / cycle))
        warm_s = timed_steps(stepper, warm, device) / warm
        # Whole precompute cycles, so one large image batch is amortised over the steps using it;
        # slow configurations (CoCoOp at 1000 classes) measure fewer steps, about PASS_SECONDS a pass.
        n = cycle * max(1, min(math.ceil(steps / cycle), math.ceil(PASS_SECONDS / max(warm_s * cycle, 1e-9))))
        clock.totals()
        breakdown_s = timed_steps(stepper, n, device)
        phases = {k: v / n for k, v in clock.totals().items()}
        # From here on whole steps only: the wrapped phases record nothing (no events, no records).
        stepper.clock = None
        clock.enabled = False
        if flops is None and style == "fast":
            flops = stepper.model_flops_per_step()
        if style == "fast" and compile:  # a second, compiled stepper for the throughput pass
            del stepper
            reset_memory(device)
            torch._dynamo.reset()  # each configuration compiles afresh (and stays under dynamo's cache limit)
            stepper = Stepper(style, clip, method, batch, classes, device=device, feature_batch=feature_batch,
                              text_chunk_size=text_chunk_size, compile=True, cuda_graphs=cuda_graphs,
                              num_workers=num_workers, precompute=precompute)
            timed_steps(stepper, cycle * max(1, math.ceil(warmup / cycle)), device)
        elif device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        passes = [timed_steps(stepper, n, device) / n for _ in range(repeats)]
        step_s = statistics.median(passes)
        record.update({
            "steps": n, "steps_per_cycle": cycle, "step_ms": 1e3 * step_s, "images_per_s": batch / step_s,
            "step_ms_passes": [1e3 * p for p in passes],
            "breakdown_ms": {k: 1e3 * v for k, v in sorted(phases.items())},
            "breakdown_pass_step_ms": 1e3 * breakdown_s / n,
            "peak_memory_bytes": peak_memory(device), "model_flops_per_step": flops,
            # Counted by torch.utils.flop_counter over one fast-path step; chunked text encoding
            # (more prompts than text_chunk_size) includes its recomputed forward.
            "text_recomputed": bool(text_chunk_size) and _text_rows(method, batch, classes) > text_chunk_size,
            "mfu": (flops / step_s / peak_rate) if flops and peak_rate else None,
            "precompute_image_features": stepper.precompute, "compile": bool(compile and style == "fast"),
            "cuda_graphs": bool(cuda_graphs and compile and style == "fast" and device.type == "cuda"),
            "oom": False,
        })
    except RuntimeError as err:
        if not is_oom(err):
            raise
        record.update({"oom": True, "error": str(err).splitlines()[0][:200]})
    finally:
        del stepper
        reset_memory(device)
    return record


def _text_rows(method: str, batch: int, classes: int) -> int:
    return batch * classes if method.endswith("cocoop") else classes



def precompute_comparison(clip, method: str, batch: int, classes: int, *, device: torch.device, steps: int,
                          warmup: int, feature_batch: int, text_chunk_size: Optional[int], num_workers: int,
                          repeats: int = 3) -> dict:
    """The fast style's step time with the no-grad image features encoded ahead (in batches of
    `feature_batch` images) and encoded in each step, measured alike in one process: the
    measurement behind train.precompute_features=auto. The two are interleaved pass by pass so a
    change in the machine's load falls on both. `ratio` = on / off (< 1: precomputing is faster)."""
    record = {"method": method, "batch": batch, "classes": classes, "feature_batch": feature_batch}
    steppers = {}
    try:
        for on in (True, False):
            steppers[on] = Stepper("fast", clip, method, batch, classes, device=device, feature_batch=feature_batch,
                                   text_chunk_size=text_chunk_size, num_workers=num_workers, precompute=on)
        if not steppers[True].precompute:
            return {**record, "applies": False}  # a prompted image encoder: nothing to encode ahead
        # Whole precompute cycles in every pass, for both settings: the large batch is amortised.
        cycle = steppers[True].steps_per_cycle
        n = cycle * max(1, math.ceil(steps / cycle))
        for stepper in steppers.values():
            timed_steps(stepper, cycle * max(1, math.ceil(warmup / cycle)), device)
        passes = {True: [], False: []}
        for _ in range(repeats):
            for on, stepper in steppers.items():
                passes[on].append(timed_steps(stepper, n, device) / n)
        on_s, off_s = statistics.median(passes[True]), statistics.median(passes[False])
        record.update({"applies": True, "steps": n, "on_step_ms": 1e3 * on_s, "off_step_ms": 1e3 * off_s,
                       "on_step_ms_passes": [1e3 * p for p in passes[True]],
                       "off_step_ms_passes": [1e3 * p for p in passes[False]], "ratio": on_s / off_s})
    except RuntimeError as err:
        if not is_oom(err):
            raise
        record.update({"oom": True, "error": str(err).splitlines()[0][:200]})
    finally:
        steppers.clear()
        reset_memory(device)
    return record


def precompute_line(r: dict) -> str:
    """One precompute comparison as a line of the printed table."""
    head = f"precompute {r['method']} B={r['batch']} C={r['classes']} (feature batch {r.get('feature_batch')})"
    if "error" in r:
        return f"{head}: {r['error']}"
    if not r.get("applies"):
        return f"{head}: not applicable (the image encoder is trained)"
    return (f"{head}: {r['on_step_ms']:.2f} ms/step encoded ahead, {r['off_step_ms']:.2f} ms/step in each step "
            f"(ratio {r['ratio']:.3f})")
