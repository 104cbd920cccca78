"""What the kernel benchmark tables and their pytest-benchmark suites share: the command line,
host timing, input rotation, the run header and where results are written."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def parse_table_args(description: str, argv=None) -> tuple[argparse.Namespace, torch.device]:
    """`--smoke` (tiny shapes on the CPU) and `--out`; the GPU if there is one, else smoke only."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder for the JSON file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        parser.error("no GPU here: only --smoke runs on the CPU (the Triton interpreter is far too slow to time)")
    return args, device


class Rotation:
    """Cycles through several input sets (and, for backward, their retained graphs), so repeated
    timed calls do not hit the same inputs in cache."""

    def __init__(self, items):
        self.items, self.i = items, 0

    def next(self):
        item = self.items[self.i % len(self.items)]
        self.i += 1
        return item


def median_ms_host(fn, reps: int) -> float:
    """Median wall-clock ms of `fn` over `reps` calls after two warm-ups (compilation, first launch)."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def synced(fn):
    """`fn` followed by a CUDA synchronise: pytest-benchmark reads a host clock."""
    def run():
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    return run


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"


def run_header(benchmark: str, device: torch.device, smoke: bool) -> dict:
    """benchmark, mode, device, versions and date (UTC) for the top of a result JSON."""
    import triton

    return {
        "benchmark": benchmark,
        "mode": "smoke (CPU, Triton interpreter: not a speed measurement)" if smoke else "gpu",
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_report(report: dict, out_dir: Path, device: torch.device, smoke: bool) -> Path:
    """<out_dir>/<benchmark>_<device or smoke_cpu>_<UTC stamp>.json"""
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "smoke_cpu" if smoke else torch.cuda.get_device_name(device).replace(" ", "_").lower()
    stamp = datetime.datetime.fromisoformat(report["date"]).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"{report['benchmark']}_{slug}_{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def publish(report: dict, args: argparse.Namespace, device: torch.device, settings: str, table: str,
            skipped: dict) -> Path:
    """Write the report (write_report) and print its header line, the table and the skipped peers."""
    path = write_report(report, args.out, device, args.smoke)
    print(f"{report['device']} | torch {report['torch']} | triton {report['triton']} | {settings}")
    print(table)
    for name, why in skipped.items():
        print(f"peer {name}: {why}")
    print(f"wrote {path}")
    return path
