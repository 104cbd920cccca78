"""`fastprompt report RUN_DIR...`: one Markdown table and one PNG chart from runs' results.json.

Runs of the same protocol share a table; base-to-new runs get Base / New / HM (seed means, HM of
the means), transfer runs one column per target, few-shot runs one column per shot count.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import MissingFileError, ResultsError

__all__ = ["harmonic_mean", "load_results", "markdown_table", "draw_chart", "write_report"]


def harmonic_mean(base: float, new: float) -> float:
    """HM of base and new accuracy, as the base-to-new papers report it (0 when both are 0)."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def load_results(run_dirs: list[str | Path]) -> list[dict]:
    results = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "results.json" if Path(run_dir).is_dir() else Path(run_dir)
        if not path.is_file():
            raise MissingFileError(f"no results.json in {run_dir}: run `fastprompt train` there first")
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ResultsError(f"{path} is not valid JSON ({exc}); rerun `fastprompt eval {path.parent}` to "
                             "write it again from the run's checkpoints") from None
        if not isinstance(data, dict) or "protocol" not in data:
            raise ResultsError(f"{path} is not a fastprompt results.json (no 'protocol'); pass run folders "
                             "written by `fastprompt train`")
        data["_run_dir"] = str(path.parent)
        results.append(data)
    return results


def _label(r: dict) -> str:
    return f"{r['method']} / {r['dataset']}"


def _fmt(x: float) -> str:
    return f"{x:.2f}"


def markdown_table(results: list[dict]) -> str:
    """One table per protocol present in `results`."""
    out = []
    for protocol in dict.fromkeys(r["protocol"] for r in results):
        rows = [r for r in results if r["protocol"] == protocol]
        seeds = sorted({s for r in rows for s in r["seeds"]})
        out.append(f"### {protocol} ({rows[0]['model']}, seeds {', '.join(map(str, seeds))})\n")
        if protocol == "base2new":
            out.append("| method | dataset | Base | New | HM | train images/s |")
            out.append("|---|---|---:|---:|---:|---:|")
            for r in rows:
                rate = sum(run["train"].get("images_per_s", 0) for run in r["runs"]) / len(r["runs"])
                m = r["mean"]
                out.append(f"| {r['method']} | {r['dataset']} | {_fmt(m['base'])} | {_fmt(m['new'])} | "
                           f"{_fmt(m['hm'])} | {rate:.1f} |")
            # A sweep: each method's mean over its datasets, HM of the means (as the papers report).
            for method in dict.fromkeys(r["method"] for r in rows):
                mine = [r for r in rows if r["method"] == method]
                if len(mine) > 1:
                    b = sum(r["mean"]["base"] for r in mine) / len(mine)
                    n = sum(r["mean"]["new"] for r in mine) / len(mine)
                    out.append(f"| **{method}** | **average of {len(mine)}** | {_fmt(b)} | {_fmt(n)} | "
                               f"{_fmt(harmonic_mean(b, n))} | |")
        elif protocol in ("cross_dataset", "domain_generalisation"):
            columns = list(dict.fromkeys(c for r in rows for c in r["targets"]))
            out.append("| method | source | source acc. | " + " | ".join(columns) + " | target mean |")
            out.append("|---|---|" + "---:|" * (len(columns) + 2))
            for r in rows:
                targets = r["mean"]["targets"]
                cells = [_fmt(targets[c]) if c in targets else "-" for c in columns]
                out.append(f"| {r['method']} | {r['dataset']} | {_fmt(r['mean']['source'])} | " + " | ".join(cells)
                           + f" | {_fmt(r['target_mean'])} |")
        elif protocol == "few_shot":
            shots = sorted({int(s) for r in rows for s in r["results"]})
            out.append("| method | dataset | " + " | ".join(f"{s}-shot" for s in shots) + " |")
            out.append("|---|---|" + "---:|" * len(shots))
            for r in rows:
                cells = [_fmt(r["results"][str(s)]["mean"]) if str(s) in r["results"] else "-" for s in shots]
                out.append(f"| {r['method']} | {r['dataset']} | " + " | ".join(cells) + " |")
        else:
            out.append("| method | dataset | accuracy |")
            out.append("|---|---|---:|")
            for r in rows:
                out.append(f"| {r['method']} | {r['dataset']} | {_fmt(r['mean']['accuracy'])} |")
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
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    series = [_chart_series(r) for r in results]
    metrics = list(dict.fromkeys(k for s in series for k in s))
    width = 0.8 / max(len(metrics), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(results) * max(len(metrics), 1) * 0.6 + 2), 3.6))
    for j, metric in enumerate(metrics):
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(results))]
        ys = [s.get(metric, 0.0) for s in series]
        bars = ax.bar(xs, ys, width, label=metric)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(results)), [_label(r) for r in results], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, ncols=min(len(metrics), 5), loc="upper right")
    ax.set_title(", ".join(dict.fromkeys(r["protocol"] for r in results)), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write report.md and chart.png (into out_dir, default the first run's folder)."""
    results = load_results(run_dirs)
    out = Path(out_dir) if out_dir is not None else Path(results[0]["_run_dir"])
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    md = out / "report.md"
    md.write_text(table + "\n![chart](chart.png)\n")
    chart = draw_chart(results, out / "chart.png")
    return md, chart
