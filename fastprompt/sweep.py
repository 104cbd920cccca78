"""`fastprompt sweep SWEEP.yaml`: every (method, dataset, seed) of a protocol, restartable.

A sweep file names the runs; each run's config is composed from the layers fastprompt ships
(protocol x method x dataset, as `fastprompt train --protocol P --method M --dataset D`), unless the
file names one `config` for all methods or a `configs_dir` of <protocol>/<method>.yaml files
(docs/training.md):

    protocol: base2new                   # the protocol's layer
    methods: [dept+coop, coop]           # method.name values
    datasets: [caltech101, dtd]
    seeds: [1, 2, 3]
    overrides: [data.root=/data]         # key=value for every run (command-line overrides add to these)
    output_dir: runs/sweep/{protocol}/{method}/{dataset}   # optional; one folder per (method, dataset)
    report_dir: runs/sweep/{protocol}    # optional; where report.md and chart.png go
    # config: configs/demo.yaml          # optional: one config for every method (method.name set per run)
    # configs_dir: configs               # optional: <protocol>/<method>.yaml files instead of the layers

Running it trains what is missing: a seed whose result.json is complete is skipped, a seed with a
checkpoint resumes from it (the config must be unchanged), the rest start fresh; then each
(method, dataset) folder gets its results.json and the sweep one report (`fastprompt report`).
With --emit-commands it prints one `fastprompt train ... --resume` line per (method, dataset, seed)
instead, for a scheduler (e.g. a Slurm array); rerunning the sweep afterwards only aggregates.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import shlex
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import distributed
from .config import Config, ConfigError, compose_config, load_config, read_yaml
from .protocols import run_protocol, silent
from .report import write_report
from .run_folder import RunFolder

__all__ = ["Sweep", "SweepRun", "load_sweep", "expand", "emit_commands", "run_sweep", "report_folder"]


@dataclass
class Sweep:
    path: Path
    protocol: str
    methods: list[str]
    datasets: list[str]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    output_dir: str = "runs/sweep/{protocol}/{method}/{dataset}"
    report_dir: Optional[str] = None
    config: Optional[str] = None
    configs_dir: Optional[str] = None


@dataclass
class SweepRun:
    """One (method, dataset) folder and the seeds it holds; `command(seed)` trains one seed.
    Its config comes from `config_path`, or (None) from the layers of (protocol, method)."""

    protocol: str
    method: str
    dataset: str
    seeds: list[int]
    config_path: Optional[Path]
    overrides: list[str]
    output_dir: str

    def config(self, seeds: Optional[list[int]] = None) -> Config:
        seeds = self.seeds if seeds is None else seeds
        overrides = [*self.overrides, f"data.seeds={list(seeds)}"]
        if self.config_path is None:
            return compose_config(self.protocol, self.method, overrides=overrides)
        return load_config(self.config_path, overrides)

    def command(self, seed: int) -> str:
        source = ([str(self.config_path.resolve())] if self.config_path is not None
                  else ["--protocol", self.protocol, "--method", self.method])
        return shlex.join(["fastprompt", "train", *source, *self.overrides, f"data.seeds=[{seed}]", "--resume"])


_FIELDS = {f.name for f in dataclasses.fields(Sweep)} - {"path"}


def _list(data: dict, key: str, path: Path, kind: type) -> list:
    value = data.get(key)
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{path}: '{key}' must be a non-empty list, e.g. {key}: "
                          + ("[1, 2, 3]" if kind is int else "[a, b]"))
    bad = [v for v in value if not isinstance(v, kind) or isinstance(v, bool)]
    if bad:
        raise ConfigError(f"{path}: '{key}' must hold {kind.__name__}s, got {bad[:3]}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{path}: '{key}' lists {sorted({v for v in value if value.count(v) > 1})} twice")
    return value


def load_sweep(path: str | Path, overrides: list[str] = ()) -> Sweep:
    """Read and check a sweep file; `overrides` (key=value) are appended to its own."""
    path = Path(path)
    data = read_yaml(path, "sweep file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with protocol, methods, datasets, seeds")
    for key in data:
        if key not in _FIELDS:
            close = difflib.get_close_matches(str(key), sorted(_FIELDS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f" (keys: {', '.join(sorted(_FIELDS))})"
            raise ConfigError(f"{path}: unknown sweep key '{key}'{hint}")
    protocol = data.get("protocol")
    if not isinstance(protocol, str):
        raise ConfigError(f"{path}: 'protocol' is required, e.g. protocol: base2new")
    own = data.get("overrides") or []
    if not isinstance(own, list) or not all(isinstance(o, str) and "=" in o for o in own):
        raise ConfigError(f"{path}: 'overrides' must be a list of key=value strings, e.g. [data.root=/data]")
    for key in ("output_dir", "report_dir", "config", "configs_dir"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ConfigError(f"{path}: '{key}' must be a string (a path), got {data[key]!r}")
    if data.get("report_dir"):
        _check_report_dir(data["report_dir"], path)
    sweep = Sweep(path=path, protocol=protocol, methods=_list(data, "methods", path, str),
                  datasets=_list(data, "datasets", path, str), seeds=_list(data, "seeds", path, int),
                  overrides=[*own, *overrides],
                  **{k: data[k] for k in ("output_dir", "report_dir", "config", "configs_dir") if data.get(k)})
    for override in sweep.overrides:
        key = override.split("=", 1)[0].strip()
        if key in ("data.dataset", "data.seeds", "method.name", "output_dir", "protocol.name"):
            raise ConfigError(f"override '{override}': the sweep sets {key} itself; list the values in the sweep "
                              "file (methods, datasets, seeds, output_dir) instead")
    return sweep


REPORT_DIR_PLACEHOLDERS = ("protocol",)


def _check_report_dir(value: str, path: Path) -> None:
    # One report for the whole sweep: only {protocol} is known there (not {method} or {dataset}).
    allowed = ", ".join("{" + p + "}" for p in REPORT_DIR_PLACEHOLDERS)
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"{path}: report_dir '{value}' is not a valid path pattern ({exc}); "
                          f"the only placeholder allowed is {allowed}, write literal braces as {{{{ }}}}") from None
    bad = sorted({f for f in fields if f not in REPORT_DIR_PLACEHOLDERS})
    if bad:
        raise ConfigError(f"{path}: report_dir '{value}' uses " + ", ".join("{" + f + "}" for f in bad)
                          + f"; one report covers the whole sweep, so the only placeholder allowed is {allowed}")


def report_folder(sweep: Sweep, runs: list[SweepRun]) -> Path:
    """Where the sweep's report goes: report_dir (with {protocol} filled), else the folder the
    run folders share."""
    if sweep.report_dir:
        return Path(sweep.report_dir.format(protocol=sweep.protocol))
    parents = [os.path.abspath(Path(r.output_dir).parent) for r in runs]
    return Path(os.path.commonpath(parents))


def _relative(sweep: Sweep, name: str) -> Path:
    # Paths in a sweep file: as given when they exist from here, else next to the sweep file.
    p = Path(name)
    return p if p.is_absolute() or p.exists() else sweep.path.parent / p


def _method_config(sweep: Sweep, method: str) -> Optional[Path]:
    """The config file of `method`'s runs; None: composed from the shipped layers."""
    if sweep.config:
        path = _relative(sweep, sweep.config)
        if not path.is_file():
            raise ConfigError(f"{sweep.path}: config {sweep.config} not found")
        return path
    if not sweep.configs_dir:
        return None
    folder = _relative(sweep, sweep.configs_dir) / sweep.protocol
    path = folder / f"{method.replace('+', '_')}.yaml"
    if path.is_file():
        return path
    known = sorted(p.stem.replace("_", "+", 1) if p.stem.startswith("dept_") else p.stem
                   for p in folder.glob("*.yaml")) if folder.is_dir() else []
    raise ConfigError(f"{sweep.path}: no config for method '{method}' under {folder}"
                      + (f" (there: {', '.join(known)})" if known else "")
                      + "; set 'config: FILE' for one config for all methods, or leave out 'configs_dir' to "
                        "use the shipped layers")


def expand(sweep: Sweep) -> list[SweepRun]:
    """The sweep's (method, dataset) folders, each with every seed; configs checked up front."""
    runs = []
    for method in sweep.methods:
        config_path = _method_config(sweep, method)
        for dataset in sweep.datasets:
            # A config file is told the method and protocol; the layers are made of them.
            chosen = [f"method.name={method}", f"protocol.name={sweep.protocol}"] if config_path is not None else []
            overrides = [*sweep.overrides, *chosen, f"data.dataset={dataset}", f"output_dir={sweep.output_dir}"]
            run = SweepRun(protocol=sweep.protocol, method=method, dataset=dataset, seeds=list(sweep.seeds),
                           config_path=config_path, overrides=overrides, output_dir="")
            cfg = run.config()  # a bad override or value fails here, before anything runs
            run.output_dir = cfg.output_dir
            # Pin the folder: placeholders are filled once, so every seed's command writes the same place.
            run.overrides[-1] = f"output_dir={cfg.output_dir}"
            runs.append(run)
    folders = [r.output_dir for r in runs]
    clash = sorted({f for f in folders if folders.count(f) > 1})
    if clash:
        raise ConfigError(f"{sweep.path}: output_dir '{sweep.output_dir}' gives several runs the same folder "
                          f"({clash[0]}); use the {{method}} and {{dataset}} placeholders")
    return runs


def emit_commands(sweep: Sweep) -> list[str]:
    """One `fastprompt train ... --resume` line per (method, dataset, seed)."""
    return [run.command(seed) for run in expand(sweep) for seed in run.seeds]


def _run_folder(run: SweepRun, folder: RunFolder, label: str, say: Callable[[str], None]) -> dict:
    """Skip, resume or run one (method, dataset) folder; its status row."""
    out, cfg = folder.root, run.config()
    row = {"method": run.method, "dataset": run.dataset, "output_dir": str(out)}
    if folder.is_complete(run.seeds):
        folder.check_unchanged(cfg)  # finished with another config: say so rather than report old numbers
        say(f"{label}: finished, skipped ({out})")
        return {**row, "status": "finished"}
    resuming = folder.has_checkpoints()
    say(f"{label}: {'resuming' if resuming else 'running'} seeds {run.seeds} in {out}")
    run_protocol(cfg, resume=True, say=lambda m: say("    " + m))
    folder.record_config(cfg)  # the whole seed list, for `fastprompt eval`
    return {**row, "status": "resumed" if resuming else "ran"}


def run_sweep(sweep: Sweep, *, say: Callable[[str], None] = print) -> tuple[list[dict], Optional[Path]]:
    """Run (or skip, or resume) every run; write each results.json and the report. Returns the
    per-folder status rows and the report path."""
    runs = expand(sweep)
    if not distributed.is_main():
        say = silent  # under torchrun every rank runs each protocol; rank 0 reports and writes
    rows = []
    for i, run in enumerate(runs, 1):
        folder = RunFolder(run.output_dir)
        label = f"[{i}/{len(runs)}] {run.method} / {run.dataset}"
        with folder.locked("fastprompt sweep", shared=True, say=say):  # per-seed jobs may share it, not a seed
            rows.append(_run_folder(run, folder, label, say))
    report_dir = report_folder(sweep, runs)
    md = report_dir / "report.md"
    if distributed.is_main():
        md, _ = write_report([r["output_dir"] for r in rows], report_dir)
    distributed.barrier()
    return rows, md
