"""A run folder: its layout, and the rules for when what it holds may be continued or reused.

One `fastprompt train` (or `eval`, or one (method, dataset) of a sweep) owns one folder, its
`output_dir`:

    config.yaml                     the resolved config the run was trained with
    results.json                    the aggregate over seeds (what `fastprompt report` reads)
    report.md, chart.png            the table and chart of results.json
    splits/                         few-shot samples, cached per (dataset, shots, seed)
    features/                       test-image features, cached per backbone (data.cache_dir moves both)
    [shots<k>/]seed<s>/             one seed (few-shot protocol: one shot count and seed):
        train.log, metrics.jsonl, tensorboard/
        checkpoints/                step-<n>/ folders and `latest` (fastprompt.checkpoint)
        result.json                 that seed's accuracies, written once it is evaluated

The rules, all here so that `train`, `--resume`, `eval` and `sweep` apply the same ones:
- a fresh `train` refuses a folder that already holds a run (`--resume` continues it, `--overwrite`
  replaces it);
- `--resume` continues from the newest checkpoint only when the config agrees on every key that
  shapes training (RESUME_FREE_KEYS may differ);
- `eval` loads a checkpoint only when the config agrees on every key that shapes the model
  (EVAL_FREE_KEYS may differ);
- a seed whose result.json is complete, trained with an unchanged config, is finished: reused, not
  run again.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from . import distributed
from .atomic_io import atomic_write_bytes
from .checkpoint import latest_checkpoint_dir, load_checkpoint
from .config import Config, config_to_dict, load_config, save_config
from .errors import CheckpointError, ConfigError, RunFolderError

__all__ = [
    "CONFIG_FILE", "RESULTS_FILE", "RESULT_FILE", "CHECKPOINTS", "TRAIN_LOG", "METRICS_FILE",
    "RESUME_FREE_KEYS", "EVAL_FREE_KEYS", "RunFolder", "checkpoints_dir", "write_json", "config_changes",
    "check_resumable", "check_evaluable", "load_trained", "finished_result",
]

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
RESULT_FILE = "result.json"
CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train.log"
METRICS_FILE = "metrics.jsonl"

# Keys whose change would not make a resumed run differ from the run it continues.
RESUME_FREE_KEYS = frozenset({
    "output_dir", "train.progress", "train.num_workers", "train.log_every", "train.device", "train.eval_batch_size",
    "train.checkpoint_every", "protocol.targets",
    # one seed's (or shot count's) training does not depend on the others in the list
    "data.seeds", "protocol.shots",
    "train.feature_cache",
})
# Keys `fastprompt eval` may change against the checkpoint it loads: the resume ones, where the data
# is, and what only evaluation reads. Any other change would evaluate a model the run did not train.
EVAL_FREE_KEYS = RESUME_FREE_KEYS | {"data.root", "data.cache_dir", "data.allow_corrupt", "train.text_chunk_size"}


def checkpoints_dir(seed_dir: str | Path) -> Path:
    """Where one seed's checkpoints live."""
    return Path(seed_dir) / CHECKPOINTS


def write_json(path: Path, payload: dict) -> None:
    """A result file, written atomically by rank 0 (the other ranks computed the same numbers)."""
    if distributed.is_main():
        atomic_write_bytes(path, (json.dumps(payload, indent=1) + "\n").encode())


class RunFolder:
    """The folder `root` one command trains into and reports from (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def results_path(self) -> Path:
        return self.root / RESULTS_FILE

    def seed_dir(self, seed: int, *, shots: Optional[int] = None, create: bool = True) -> Path:
        path = self.root / (f"shots{shots}" if shots is not None else "") / f"seed{seed}"
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def splits_dir(self, cache_dir: Optional[str] = None) -> Path:
        """The few-shot split cache: data.cache_dir itself when set, else splits/ here."""
        return Path(cache_dir) if cache_dir else self.root / "splits"

    def features_dir(self, cache_dir: Optional[str] = None) -> Path:
        """The test-feature cache: features/ under data.cache_dir when set, else here."""
        return Path(cache_dir or self.root) / "features"

    # ------------------------------------------------------------------ state of the folder

    def earlier_run(self) -> Optional[Path]:
        """A file showing the folder already holds a run (results or a checkpoint), or None."""
        if not self.root.is_dir():
            return None
        found = [p for p in (self.results_path, *self.root.glob(f"**/{CHECKPOINTS}/latest")) if p.is_file()]
        return found[0] if found else None

    def refuse_earlier_run(self) -> None:
        """A plain `train` must not silently replace a run that is already there."""
        found = self.earlier_run()
        if found is not None:
            raise RunFolderError(
                f"output_dir {self.root} already holds a run ({found}); continue it with --resume, train elsewhere "
                "with output_dir=..., or start it again with --overwrite (docs/training.md#the-run-folder)"
            )

    def has_checkpoints(self) -> bool:
        return self.root.is_dir() and any(self.root.rglob(f"{CHECKPOINTS}/latest"))

    def require_config(self) -> Path:
        """The folder's config.yaml; RunFolderError when this is not a run folder."""
        if not self.config_path.is_file():
            raise RunFolderError(f"{self.root} is not a run folder (no {CONFIG_FILE}); pass the output_dir of a "
                                 "train run")
        return self.config_path

    def open(self, cfg: Config, *, keep_config: bool) -> None:
        """Create the folder and, unless `keep_config` (resume, eval) finds one, record cfg in it:
        config.yaml says how the run was trained, so `--resume` and `eval` keep it as it is."""
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"output_dir: {self.root} exists and is not a folder; choose another output_dir=...")
        self.root.mkdir(parents=True, exist_ok=True)
        if distributed.is_main() and not (keep_config and self.config_path.exists()):
            save_config(cfg, self.config_path)

    def record_config(self, cfg: Config) -> None:
        """Write cfg as the folder's config (a sweep: the whole seed list, for `fastprompt eval`)."""
        if distributed.is_main():
            save_config(cfg, self.config_path)

    def check_unchanged(self, cfg: Config) -> None:
        """The saved config.yaml must agree with `cfg` on every key that affects results, or the
        results here are not cfg's: ConfigError naming the changed keys."""
        if self.config_path.is_file():
            check_resumable(config_to_dict(load_config(self.config_path)), config_to_dict(cfg), self.config_path)

    def is_complete(self, seeds: list[int]) -> bool:
        """results.json aggregates exactly `seeds` (one seed's job of an emitted command list writes
        its own view: aggregate again)."""
        try:
            results = json.loads(self.results_path.read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(results, dict) or results.get("seeds") != seeds:
            return False
        return "mean" in results or "results" in results

    def write_results(self, payload: dict) -> None:
        write_json(self.results_path, payload)


# ---------------------------------------------------------------------- config compatibility


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "options":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, current: dict, free: frozenset | set) -> str:
    """"key: old -> new, ..." for every key outside `free` that differs ("" when none does)."""
    a, b = _flat(saved), _flat(current)
    changed = [k for k in sorted(set(a) | set(b)) if k not in free and a.get(k) != b.get(k)]
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed)


def check_resumable(saved: dict, current: dict, where: Path) -> None:
    diffs = config_changes(saved, current, RESUME_FREE_KEYS)
    if diffs:
        raise ConfigError(
            f"cannot resume from {where}: the config changed ({diffs}). Restore those values, "
            "or start a fresh run in a new output_dir (docs/training.md#the-run-folder lists the keys that may change)"
        )


def check_evaluable(saved: dict, current: dict, where: Path) -> None:
    diffs = config_changes(saved, current, EVAL_FREE_KEYS)
    if diffs:
        raise ConfigError(
            f"cannot evaluate {where} with this config: it was trained with other values ({diffs}). "
            "Drop those overrides (eval may change only "
            + ", ".join(sorted(EVAL_FREE_KEYS - {"output_dir"})) + "), or train a new run with them"
        )


# ---------------------------------------------------------------------- one seed's files


def load_trained(model, seed_dir: str | Path, config: Optional[dict] = None) -> dict:
    """Load the newest checkpoint of seed_dir into model; returns its meta. For `fastprompt eval`.

    With `config` (the current config as a dict), a checkpoint trained with other values of keys
    that shape or train the model is refused with a ConfigError naming them, before loading."""
    root = checkpoints_dir(seed_dir)
    if latest_checkpoint_dir(root) is None:
        raise CheckpointError(f"no checkpoint under {root}; train first (fastprompt train ...)")
    ckpt = load_checkpoint(root)
    if config is not None and isinstance(ckpt.meta.get("config"), dict):
        check_evaluable(ckpt.meta["config"], config, root)
    model.load_state_dict(ckpt.model_state)
    return ckpt.meta


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def finished_result(seed_dir: Path, seed: int, keys: tuple[str, ...], cfg: Config) -> Optional[dict]:
    """seed_dir/result.json when it is complete for `seed` (every key present, numbers finite), else None.

    A finished run whose checkpoint or run config was trained with different settings is an error,
    not a skip: reusing it would mix two configurations in one table.
    """
    try:
        result = json.loads((Path(seed_dir) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or result.get("seed") != seed:
        return None
    for key in keys:
        value = result.get(key)
        if key == "targets":
            if not isinstance(value, dict) or not all(_finite(value.get(t)) for t in cfg.protocol.targets):
                return None
        elif not _finite(value):
            return None
    RunFolder(cfg.output_dir).check_unchanged(cfg)  # also covers runs with no checkpoint (zero-shot CLIP)
    root = checkpoints_dir(seed_dir)
    if latest_checkpoint_dir(root) is not None:
        check_resumable(load_checkpoint(root).meta["config"], config_to_dict(cfg), root)
    return result
