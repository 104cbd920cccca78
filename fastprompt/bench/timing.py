"""Timing on the device: phase clocks, the measured bf16 matmul rate (the MFU denominator), peak
memory, and the environment a result was measured in.

CUDA events on a GPU (a phase records an event pair, no syncs inside a step), the host clock on the CPU.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import platform
import statistics
import sys
import time
from typing import Callable, Optional

import torch

__all__ = ["PhaseClock", "sync", "measure_matmul_rate", "peak_memory", "reset_memory", "is_oom", "environment"]


class PhaseClock:
    """Named, possibly nested phases; `totals()` gives each name's self time in seconds (a nested
    phase's time is taken out of its parent's). With `enabled = False` phases and wrapped
    functions record nothing (no events, no host clock): the throughput pass runs so."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.enabled = True
        self._records: list[tuple[str, object, object, list]] = []
        self._stack: list[list] = []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        start = self._mark()
        children: list = []
        self._stack.append(children)
        try:
            yield
        finally:
            self._stack.pop()
            end = self._mark()
            self._records.append((name, start, end, children))
            if self._stack:
                self._stack[-1].append((start, end))

    def wrap(self, fn: Callable, name: str) -> Callable:
        def timed(*args, **kwargs):
            if not self.enabled:
                return fn(*args, **kwargs)
            with self.phase(name):
                return fn(*args, **kwargs)

        return timed

    def totals(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for name, start, end, children in self._records:
            inner = sum(self._seconds(s, e) for s, e in children)
            out[name] = out.get(name, 0.0) + self._seconds(start, end) - inner
        self._records.clear()
        return out



def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_rate(device: torch.device, *, smoke: bool) -> dict:
    """The device's bf16 matmul rate (FLOP/s), measured: the MFU denominator."""
    # 8192^3 fills an H100 for about 1.5 ms per product; on a CPU the rate is indicative only (MFU
    # there compares fp32/bf16 kernels of very different efficiency).
    n = 512 if smoke or device.type != "cuda" else 8192
    reps = 3 if smoke else 20
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    times = []
    for i in range(reps + 2):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= 2:  # the first calls pick kernels / warm caches
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return {"flops_per_s": 2 * n**3 / seconds, "n": n, "dtype": "bfloat16", "median_s": seconds,
            "meaningful": device.type == "cuda" and not smoke}



def peak_memory(device: torch.device) -> Optional[int]:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def is_oom(err: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # older torch: cuda's only
    return isinstance(err, oom_type) or "out of memory" in str(err).lower()


def environment(device: torch.device, matmul: dict) -> dict:
    """Device, versions and date of a measurement, with the measured matmul rate."""
    import open_clip

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": name, "device_type": device.type,
            "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
            "cpu_threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "triton": triton_version, "open_clip": open_clip.__version__,
                         "python": sys.version.split()[0], "cuda": torch.version.cuda},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "bf16_matmul": matmul}

