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


def parse_table_args(description: str, argv=None, *, cpu_mode: bool = False) -> tuple[argparse.Namespace, torch.device]:
    """`--smoke` (tiny shapes on the CPU), `--out`, and with `cpu_mode` `--cpu` (the table's non-Triton
    paths timed on the CPU); the GPU if there is one, else smoke (or --cpu) only."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    if cpu_mode:
        parser.add_argument("--cpu", action="store_true",
                            help="the paths that need no Triton, at CPU-sized CLIP shapes, timed on the CPU")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder for the JSON file")
    args = parser.parse_args(argv)
    args.cpu = bool(getattr(args, "cpu", False))
    if args.cpu and args.smoke:
        parser.error("--cpu and --smoke are two different CPU runs: give one")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cpu" and not (args.smoke or args.cpu):
        hint = " (or --cpu: the non-Triton paths)" if cpu_mode else ""
        parser.error(f"no GPU here: only --smoke{hint} runs on the CPU (the Triton interpreter is far too slow to time)")
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


def median_ms_host(fn, reps: int, clock=time.perf_counter) -> float:
    """Median ms of `fn` over `reps` calls after two warm-ups (compilation, first launch), by `clock`
    (wall clock by default; time.process_time counts this process's CPU time only)."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = clock()
        fn()
        times.append((clock() - t0) * 1e3)
    return statistics.median(times)


def synced(fn):
    """`fn` followed by a CUDA synchronise: pytest-benchmark reads a host clock."""
    def run():
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    return run


def device_name(device: torch.device, smoke: bool = True) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return f"{cpu}, Triton interpreter" if smoke else cpu


def run_header(benchmark: str, device: torch.device, smoke: bool) -> dict:
    """benchmark, mode, device, versions and date (UTC) for the top of a result JSON."""
    import triton

    if smoke:
        mode = "smoke (CPU, Triton interpreter: not a speed measurement)"
    else:
        mode = "gpu" if device.type == "cuda" else "cpu (no Triton: the paths a CPU runs, timed)"
    return {
        "benchmark": benchmark,
        "mode": mode,
        "device": device_name(device, smoke),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_report(report: dict, out_dir: Path, device: torch.device, smoke: bool) -> Path:
    """<out_dir>/<benchmark>_<device or smoke_cpu>_<UTC stamp>.json"""
    out_dir.mkdir(parents=True, exist_ok=True)
    if smoke:
        slug = "smoke_cpu"
    elif device.type == "cpu":
        slug = f"cpu_{platform.machine()}"
    else:
        slug = torch.cuda.get_device_name(device).replace(" ", "_").lower()
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
