"""`fastprompt report RUN_DIR...`: one Markdown table and one PNG chart from runs' results.json.

Runs of the same protocol share a table; base-to-new runs get Base / New / HM (seed means, HM of
the means), transfer runs one column per target, few-shot runs one column per shot count.

Rows are only averaged when they are comparable: runs of one method that differ in a setting that
changes results (shots, seeds, model, weights, protocol settings, any training key, the image tree
of an imagefolder run) are labelled with it and averaged apart, and the same method on the same data
with the same settings twice (one folder given twice, or two copies) is refused rather than counted
twice. What the data made doubtful (classes without test images, a single new class, ...) is listed
under the table.
"""
from __future__ import annotations

import json
from pathlib import Path

from .atomic_io import atomic_write_bytes, ensure_dir
from .errors import ConfigError, MissingFileError, ResultsError
from .metrics import harmonic_mean
from .render import figure, grouped_bars, markdown_table as table_lines, save_figure
from .run_folder import EVAL_FREE_KEYS, RESULTS_FILE, flat_config

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


# Settings that name the row itself, or change nothing in the numbers (where the data is, batch of
# evaluation, workers, ...); every other key of the config makes two runs incomparable.
_ROW_KEYS = {"method.name", "data.dataset"}
_NEUTRAL = (EVAL_FREE_KEYS - {"data.seeds", "protocol.shots", "protocol.targets"}) | _ROW_KEYS
# Keys that make rows of *different* methods incomparable in one table (per-method training keys
# differ by design: each method's layer sets its own).
_DATA_KEYS = ("model.name", "model.pretrained", "data.shots", "data.seeds", "data.root", "protocol.shots",
              "protocol.targets")


def _settings(r: dict) -> dict:
    """What the run's numbers depend on besides its method and dataset name."""
    if isinstance(r.get("config"), dict):
        flat = {k: v for k, v in flat_config(r["config"]).items() if k not in _NEUTRAL}
    else:  # a results.json without its config: the header fields
        flat = {"model.name": r.get("model"), "model.pretrained": r.get("pretrained"), "data.shots": r.get("shots"),
                "data.seeds": r.get("seeds")}
    if r.get("dataset") == "imagefolder" and isinstance(r.get("config"), dict):
        flat["data.root"] = r["config"].get("data", {}).get("root")  # the tree *is* the dataset
    return flat


def _label_rows(rows: list[dict]) -> list[str]:
    """Each row's distinguishing settings ("" when it has none): the data keys that vary in the
    table, and any key that varies between rows of the same method. Refuses a run given twice."""
    settings = [_settings(r) for r in rows]
    keys = {k for k in _DATA_KEYS if len({repr(s.get(k)) for s in settings}) > 1}
    for method in {r["method"] for r in rows}:
        mine = [s for r, s in zip(rows, settings) if r["method"] == method]
        keys |= {k for k in set().union(*mine) if len({repr(s.get(k)) for s in mine}) > 1}
    labels = [", ".join(f"{k}={s.get(k)}" for k in sorted(keys)) for s in settings]
    seen: dict[tuple, str] = {}
    for r, label in zip(rows, labels):
        key = (r["method"], r["dataset"], _data_name(r), label)
        where = r.get("_run_dir", "a run")
        if key in seen and seen[key] == where:
            raise ResultsError(f"{where} is given twice: a table would count it twice; pass it once")
        if key in seen:
            raise ResultsError(
                f"{seen[key]} and {where} hold the same run ({r['method']} on {r['dataset']}"
                + (f", {label}" if label else "") + "): a table would count it twice; pass one of them")
        seen[key] = where
    return labels


def _data_name(r: dict) -> str:
    root = r.get("config", {}).get("data", {}).get("root") if isinstance(r.get("config"), dict) else None
    return str(root) if r.get("dataset") == "imagefolder" else ""


def _train_rate(r: dict) -> str:
    """Mean training images/s over the seeds, "-" for a row that trained nothing (zero-shot, baselines)."""
    rates = [run["train"]["images_per_s"] for run in r.get("runs") or [] if "images_per_s" in (run.get("train") or {})]
    return f"{sum(rates) / len(rates):.1f}" if rates else "-"


def _base2new_rows(rows: list[dict], labels: list[str]) -> list[list]:
    out = []
    for r, label in zip(rows, labels):
        m = r["mean"]
        out.append([r["method"], r["dataset"], *([label] if any(labels) else []), _fmt(m["base"]), _fmt(m["new"]),
                    _fmt(m["hm"]), _train_rate(r)])
    # A sweep: each method's mean over its datasets, HM of the means (as the papers report); runs
    # with different settings are averaged apart.
    for method, label in dict.fromkeys((r["method"], label) for r, label in zip(rows, labels)):
        mine = [r for r, lab in zip(rows, labels) if r["method"] == method and lab == label]
        if len(mine) > 1:
            b = sum(r["mean"]["base"] for r in mine) / len(mine)
            n = sum(r["mean"]["new"] for r in mine) / len(mine)
            out.append([f"**{method}**", f"**average of {len(mine)}**", *([label] if any(labels) else []), _fmt(b),
                        _fmt(n), _fmt(harmonic_mean(b, n)), ""])
    return out


def _protocol_table(protocol: str, rows: list[dict]) -> list[str]:
    labels = _label_rows(rows)
    setting = ["setting"] if any(labels) else []
    cell = [[label] if any(labels) else [] for label in labels]
    if protocol == "base2new":
        return table_lines(["method", "dataset", *setting, "Base", "New", "HM", "train images/s"],
                           _base2new_rows(rows, labels), "ll" + "l" * len(setting) + "rrrr")
    if protocol in ("cross_dataset", "domain_generalisation"):
        columns = list(dict.fromkeys(c for r in rows for c in r["targets"]))
        cells = [[r["method"], r["dataset"], *c, _fmt(r["mean"]["source"]),
                  *(_fmt(r["mean"]["targets"][t]) if t in r["mean"]["targets"] else "-" for t in columns),
                  _fmt(r["target_mean"])] for r, c in zip(rows, cell)]
        return table_lines(["method", "source", *setting, "source acc.", *columns, "target mean"], cells,
                           "ll" + "l" * len(setting) + "r" * (len(columns) + 2))
    if protocol == "few_shot":
        shots = sorted({int(s) for r in rows for s in r["results"]})
        cells = [[r["method"], r["dataset"], *c, *(_fmt(r["results"][str(s)]["mean"]) if str(s) in r["results"]
                                                   else "-" for s in shots)] for r, c in zip(rows, cell)]
        return table_lines(["method", "dataset", *setting, *(f"{s}-shot" for s in shots)], cells,
                           "ll" + "l" * len(setting) + "r" * len(shots))
    return table_lines(["method", "dataset", *setting, "accuracy"],
                       [[r["method"], r["dataset"], *c, _fmt(r["mean"]["accuracy"])] for r, c in zip(rows, cell)],
                       "ll" + "l" * len(setting) + "r")


def markdown_table(results: list[dict]) -> str:
    """One table per protocol present in `results`."""
    out = []
    for protocol in dict.fromkeys(r["protocol"] for r in results):
        rows = [r for r in results if r["protocol"] == protocol]
        seeds = sorted({s for r in rows for s in r["seeds"]})
        models = ", ".join(dict.fromkeys(str(r["model"]) for r in rows))
        out.append(f"### {protocol} ({models}, seeds {', '.join(map(str, seeds))})\n")
        out += _protocol_table(protocol, rows)
        out.append("")
    return "\n".join(out)


def warnings_section(results: list[dict]) -> str:
    """The runs' data warnings as a Markdown list ("" when there are none)."""
    lines = [f"- {r['method']} / {r['dataset']}: {w}" for r in results for w in r.get("warnings") or []]
    return "\n".join(["#### Warnings", "", *lines, ""]) if lines else ""


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
    labels = {}
    for protocol in dict.fromkeys(r["protocol"] for r in results):
        rows = [r for r in results if r["protocol"] == protocol]
        labels.update({id(r): label for r, label in zip(rows, _label_rows(rows))})
    grouped_bars(ax, [f"{r['method']} / {r['dataset']}" + (f"\n{labels[id(r)]}" if labels[id(r)] else "")
                      for r in results],
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
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give the folder report.md and chart.png should go to")
    table = markdown_table(results)  # refuses incomparable input before anything is written
    ensure_dir(out)
    md = out / "report.md"
    warnings = warnings_section(results)
    atomic_write_bytes(md, (table + "\n" + (warnings + "\n" if warnings else "") + "![chart](chart.png)\n").encode())
    return md, draw_chart(results, out / "chart.png")
