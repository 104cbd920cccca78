"""`fastprompt report RUN_DIR...`: one Markdown table and one PNG chart from runs' results.json.

Runs of the same protocol share a table; base-to-new runs get Base / New / HM (seed means, HM of
the means), transfer runs one column per target, few-shot runs one column per shot count.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import MissingFileError, ResultsError
from .metrics import harmonic_mean
from .render import figure, grouped_bars, markdown_table as table_lines, save_figure
from .run_folder import RESULTS_FILE

__all__ = ["load_results", "markdown_table", "draw_chart", "write_report"]


def load_results(run_dirs: list[str | Path]) -> list[dict]:
    results = []
    for run_dir in run_dirs:
        path = Path(run_dir) / RESULTS_FILE if Path(run_dir).is_dir() else Path(run_dir)
        if not path.is_file():
            raise MissingFileError(f"no {RESULTS_FILE} in {run_dir}: run `fastprompt train` there first")
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ResultsError(f"{path} is not valid JSON ({exc}); rerun `fastprompt eval {path.parent}` to "
                               "write it again from the run's checkpoints") from None
        if not isinstance(data, dict) or "protocol" not in data:
            raise ResultsError(f"{path} is not a fastprompt {RESULTS_FILE} (no 'protocol'); pass run folders "
                               "written by `fastprompt train`")
        data["_run_dir"] = str(path.parent)
        results.append(data)
    return results


def _fmt(x: float) -> str:
    return f"{x:.2f}"


def _base2new_rows(rows: list[dict]) -> list[list]:
    out = []
    for r in rows:
        rate = sum(run["train"].get("images_per_s", 0) for run in r["runs"]) / len(r["runs"])
        m = r["mean"]
        out.append([r["method"], r["dataset"], _fmt(m["base"]), _fmt(m["new"]), _fmt(m["hm"]), f"{rate:.1f}"])
    # A sweep: each method's mean over its datasets, HM of the means (as the papers report).
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        if len(mine) > 1:
            b = sum(r["mean"]["base"] for r in mine) / len(mine)
            n = sum(r["mean"]["new"] for r in mine) / len(mine)
            out.append([f"**{method}**", f"**average of {len(mine)}**", _fmt(b), _fmt(n),
                        _fmt(harmonic_mean(b, n)), ""])
    return out


def _protocol_table(protocol: str, rows: list[dict]) -> list[str]:
    if protocol == "base2new":
        return table_lines(["method", "dataset", "Base", "New", "HM", "train images/s"], _base2new_rows(rows), "llrrrr")
    if protocol in ("cross_dataset", "domain_generalisation"):
        columns = list(dict.fromkeys(c for r in rows for c in r["targets"]))
        cells = [[r["method"], r["dataset"], _fmt(r["mean"]["source"]),
                  *(_fmt(r["mean"]["targets"][c]) if c in r["mean"]["targets"] else "-" for c in columns),
                  _fmt(r["target_mean"])] for r in rows]
        return table_lines(["method", "source", "source acc.", *columns, "target mean"], cells,
                           "ll" + "r" * (len(columns) + 2))
    if protocol == "few_shot":
        shots = sorted({int(s) for r in rows for s in r["results"]})
        cells = [[r["method"], r["dataset"], *(_fmt(r["results"][str(s)]["mean"]) if str(s) in r["results"] else "-"
                                                for s in shots)] for r in rows]
        return table_lines(["method", "dataset", *(f"{s}-shot" for s in shots)], cells, "ll" + "r" * len(shots))
    return table_lines(["method", "dataset", "accuracy"],
                       [[r["method"], r["dataset"], _fmt(r["mean"]["accuracy"])] for r in rows], "llr")


def markdown_table(results: list[dict]) -> str:
    """One table per protocol present in `results`."""
    out = []
    for protocol in dict.fromkeys(r["protocol"] for r in results):
        rows = [r for r in results if r["protocol"] == protocol]
        seeds = sorted({s for r in rows for s in r["seeds"]})
        out.append(f"### {protocol} ({rows[0]['model']}, seeds {', '.join(map(str, seeds))})\n")
        out += _protocol_table(protocol, rows)
        out.append("")
    return "\n".join(out)


def _chart_series(r: dict) -> dict[str, float]:
    if r["protocol"] == "base2new":
        return {"Base": r["mean"]["base"], "New": r["mean"]["new"], "HM": r["mean"]["hm"]}
    if r["protocol"] in ("cross_dataset", "domain_generalisation"):
        return {r["dataset"]: r["mean"]["source"], **r["mean"]["targets"]}
    if r["protocol"] == "few_shot":
        return {f"{s}-shot": v["mean"] for s, v in r["results"].items()}
    return {"accuracy": r["mean"]["accuracy"]}


def draw_chart(results: list[dict], path: str | Path) -> Path:
    """Grouped bars: one group per run, one bar per metric (accuracy in %)."""
    per_run = [_chart_series(r) for r in results]
    metrics = list(dict.fromkeys(k for s in per_run for k in s))
    width = max(4.0, 1.2 * len(results) * max(len(metrics), 1) * 0.6 + 2)
    fig, axes = figure(1, 1, panel_size=(width, 3.6))
    ax = axes[0][0]
    grouped_bars(ax, [f"{r['method']} / {r['dataset']}" for r in results],
                 {m: [s.get(m, 0.0) for s in per_run] for m in metrics}, value_format="%.1f")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, ncols=min(len(metrics), 5), loc="upper right")
    ax.set_title(", ".join(dict.fromkeys(r["protocol"] for r in results)), fontsize=9)
    return save_figure(fig, path, dpi=120)


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write report.md and chart.png (into out_dir, default the first run's folder)."""
    results = load_results(run_dirs)
    out = Path(out_dir) if out_dir is not None else Path(results[0]["_run_dir"])
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text(markdown_table(results) + "\n![chart](chart.png)\n")
    return md, draw_chart(results, out / "chart.png")
