"""What `fastprompt bench train` reports: fast-over-official speed-ups, the Markdown table, the
chart (fastprompt.render, as `fastprompt report` draws its own), and `fastprompt bench report`."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from ..errors import MissingFileError, ResultsError
from ..render import figure, grouped_bars, markdown_table as table_lines, save_figure
from .stepper import STYLES
from .steps import precompute_line

__all__ = ["speedups", "draw_bench_chart", "markdown_table", "one_line", "load_bench_result"]


def failed(r: Optional[dict]) -> bool:
    return r is None or bool(r.get("oom")) or "error" in r


def speedups(records: list[dict]) -> list[dict]:
    """fast images/s over official images/s per (method, batch, classes) measured in both styles."""
    by = {(r["method"], r["batch"], r["classes"], r["style"]): r for r in records}
    out = []
    for (method, b, c, style), fast in by.items():
        off = by.get((method, b, c, "official"))
        if style != "fast" or off is None:
            continue
        row = {"method": method, "batch": b, "classes": c}
        if failed(fast) or failed(off):
            row.update(speedup=None, official_oom=bool(off.get("oom")), fast_oom=bool(fast.get("oom")))
        else:
            row.update(speedup=fast["images_per_s"] / off["images_per_s"], official_oom=False, fast_oom=False)
        out.append(row)
    return out


def draw_bench_chart(results: dict, path: str | Path) -> Path:
    """Images/s of both styles per method, one panel per (batch, classes); OOM marked; plus the
    whole-run wall times when present."""
    records = results["steps"]
    combos = sorted({(r["batch"], r["classes"]) for r in records})
    methods = list(dict.fromkeys(r["method"] for r in records))
    runs = results.get("whole_runs") or []
    panels = len(combos) + (1 if runs else 0)
    cols = min(3, panels)
    fig, axes = figure(math.ceil(panels / cols), cols, panel_size=(4.8, 3.2))
    by = {(r["method"], r["batch"], r["classes"], r["style"]): r for r in records}
    for ax, (b, c) in zip(axes.flat, combos):
        cells = {style: [by.get((m, b, c, style)) for m in methods] for style in STYLES}
        grouped_bars(ax, methods, {s: [0.0 if failed(r) else r["images_per_s"] for r in rs] for s, rs in cells.items()},
                     bar_labels={s: ["OOM" if r and r.get("oom") else ("ERR" if r and "error" in r else "") for r in rs]
                                 for s, rs in cells.items()}, label_size=6, tick_size=7, tick_rotation=60)
        ax.set_yscale("log")
        ax.set_title(f"batch {b}, {c} classes", fontsize=9)
        ax.set_ylabel("images/s", fontsize=8)
        ax.legend(fontsize=7)
    if runs:
        ax = axes.flat[len(combos)]
        names = list(dict.fromkeys(r["method"] for r in runs))
        secs = {style: {r["method"]: r["seconds"] for r in runs if r["style"] == style and "seconds" in r}
                for style in STYLES}
        grouped_bars(ax, names, {s: [secs[s].get(n, 0.0) for n in names] for s in STYLES}, tick_size=7,
                     tick_rotation=30)
        ax.set_title("whole base-to-new run", fontsize=9)
        ax.set_ylabel("wall seconds", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    fig.suptitle(f"fastprompt bench train: {results['config']['model']} on {results['environment']['device']}",
                 fontsize=10)
    return save_figure(fig, path, dpi=110)


def markdown_table(results: dict) -> str:
    lines = [f"Device: {results['environment']['device']}; model {results['config']['model']}; "
             f"bf16 matmul {results['environment']['bf16_matmul']['flops_per_s'] / 1e12:.1f} TFLOP/s measured",
             ""]
    rows = []
    for r in results["steps"]:
        head = [r["method"], r["batch"], r["classes"], r["style"]]
        if "error" in r and not r.get("oom"):
            rows.append([*head, "error", "", "", ""])
        elif r.get("oom"):
            rows.append([*head, "OOM", "", "", ""])
        else:
            mem = f"{r['peak_memory_bytes'] / 2**20:.0f}" if r.get("peak_memory_bytes") else "-"
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            rows.append([*head, f"{r['images_per_s']:.1f}", f"{r['step_ms']:.2f}", mem, mfu])
    if rows:
        lines += table_lines(["method", "batch", "classes", "style", "images/s", "step ms", "peak MB", "MFU"], rows,
                             "lrrlrrrr")
    for r in results.get("vision_mfu") or []:
        if "mfu" in r:
            lines.append(f"\nvision forward+backward {r['method']} batch {r['batch']}: {r['step_ms']:.2f} ms, "
                         f"MFU {100 * r['mfu']:.1f}%")
    for r in results.get("precompute") or []:
        lines.append("\n" + precompute_line(r))
    for r in results.get("whole_runs") or []:
        if "seconds" not in r:
            lines.append(f"\nwhole run {r['method']} {r['style']}: {r.get('error')}")
            continue
        mem = f"{r['peak_memory_bytes'] / 2**20:.0f} MB" if r.get("peak_memory_bytes") else "-"
        rate = f", {r['images_per_s']:.1f} images/s" if r.get("images_per_s") else ""
        lines.append(f"\nwhole run {r['method']} {r['style']}: {r['seconds']:.1f} s{rate}, peak {mem}")
    return "\n".join(lines)


def one_line(r: dict) -> str:
    """One configuration's record as the progress line printed while the benchmark runs."""
    head = f"{r['method']:>12} B={r['batch']:<4} C={r['classes']:<5} {r['style']:>8}"
    if "error" in r and not r.get("oom"):
        return head + "  ERROR " + r["error"]
    if r.get("oom"):
        return head + "  OOM"
    mfu = f" MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    return head + f"  {r['images_per_s']:9.1f} img/s  {r['step_ms']:8.2f} ms/step{mfu}"


def load_bench_result(path: str | Path) -> dict:
    """A JSON written by `fastprompt bench train`; ResultsError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no benchmark result at {path}: pass a JSON that `fastprompt bench train` wrote")
    try:
        results = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(results, dict) or results.get("benchmark") != "train":
        raise ResultsError(f"{path} is not a `fastprompt bench train` result")
    return results
