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
  run again;
- `eval` writes its numbers over what training wrote without losing any of it: training's record
  (steps, time, images/s, losses, the config it trained with) stays, the evaluation's own goes
  under "eval";
- one process at a time: every command holds the folder's lock (fastprompt.run_lock) for as long as
  it works there (`RunFolder.locked`); `--overwrite` clears the earlier run under that lock.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from . import distributed
from .atomic_io import atomic_write_bytes, ensure_dir, writing
from .checkpoint import latest_checkpoint_dir, load_checkpoint
from .config import Config, config_to_dict, load_config, save_config
from .errors import CheckpointError, ConfigError, FastpromptError, RunFolderError
from .run_lock import LOCK_FILE, RunLock, TerminateAsExit, in_use_error

__all__ = [
    "CONFIG_FILE", "RESULTS_FILE", "RESULT_FILE", "CHECKPOINTS", "TRAIN_LOG", "METRICS_FILE", "REPORT_FILES",
    "LOCK_FILE", "RESUME_FREE_KEYS", "EVAL_FREE_KEYS", "RunFolder", "checkpoints_dir", "write_json",
    "config_changes", "flat_config", "check_resumable", "check_evaluable", "load_trained", "finished_result",
    "evaluated_result", "evaluated_results", "read_json",
]

CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
RESULT_FILE = "result.json"
CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train.log"
METRICS_FILE = "metrics.jsonl"
REPORT_FILES = ("report.md", "chart.png")
# What a seed folder holds (`--overwrite` removes these and nothing else).
SEED_FILES = (RESULT_FILE, TRAIN_LOG, METRICS_FILE, CHECKPOINTS, "tensorboard", LOCK_FILE)
_SEED_DIR = re.compile(r"(shots\d+/)?seed-?\d+")

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
        """The folder's config.yaml; RunFolderError when this is not a run folder (or the error
        naming the process that has just started one there and not written it yet)."""
        if not self.config_path.is_file():
            busy = in_use_error(self.root)
            if busy is not None:
                raise busy
            raise RunFolderError(f"{self.root} is not a run folder (no {CONFIG_FILE}); pass the output_dir of a "
                                 "train run")
        return self.config_path

    def create(self) -> None:
        """Make the folder (and its parents); a ConfigError when output_dir is a file, a WriteError
        when it cannot be made."""
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"output_dir: {self.root} exists and is not a folder; choose another output_dir=...")
        ensure_dir(self.root)

    def open(self, cfg: Config, *, keep_config: bool) -> None:
        """Create the folder and, unless `keep_config` (resume, eval) finds one, record cfg in it:
        config.yaml says how the run was trained, so `--resume` and `eval` keep it as it is."""
        self.create()
        if distributed.is_main() and not (keep_config and self.config_path.exists()):
            save_config(cfg, self.config_path)

    def recorded_config(self) -> Optional[dict]:
        """config.yaml as a dict (every key), or None when the folder has none."""
        if not self.config_path.is_file():
            return None
        return config_to_dict(load_config(self.config_path))

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

    def write_results(self, payload: dict, *, evaluation: bool = False) -> dict:
        """Write results.json; an `evaluation` (fastprompt eval) keeps training's record in it (see
        `evaluated_results`). Returns what was written."""
        if evaluation:
            payload = evaluated_results(read_json(self.results_path), payload)
        write_json(self.results_path, payload)
        return payload

    # ------------------------------------------------------------------ one process at a time

    @contextmanager
    def locked(self, command: str, *, shared: bool = False, check: Optional[Callable[[], None]] = None,
               say: Callable[[str], None] = print) -> Iterator[None]:
        """Hold the folder's lock (fastprompt.run_lock) for the block: RunFolderInUseError naming the
        holder when another process has it. `shared`: for a command that continues the run
        (--resume, a sweep), which then locks each seed it works on (`seed_locked`). `check` runs
        once the lock is held, before the block (what must not race: "does the folder already hold
        a run?", clearing it for --overwrite).

        Under torchrun rank 0 takes the lock and runs `check`; every rank then raises rank 0's error
        or enters the block, together. Nested use in one process (a sweep's folder, then the
        protocol inside it) holds the one lock."""
        yield from _locked(self.root, command, shared=shared, check=check, say=say, create=self.create)

    @contextmanager
    def seed_locked(self, seed_dir: Path, command: str, say: Callable[[str], None] = print) -> Iterator[None]:
        """Hold one seed folder's lock while that seed is trained or evaluated: jobs continuing one
        run (a scheduler's per-seed commands) share the run folder, never a seed."""
        yield from _locked(Path(seed_dir), command, shared=False, check=None, say=say,
                           create=lambda: ensure_dir(seed_dir))

    def clear_run(self) -> None:
        """--overwrite: remove what an earlier run wrote (config.yaml, results, report, and in each
        seed folder its log, metrics, checkpoints and result), nothing else; the caches (splits/,
        features/) stay, they are keyed by what they hold. Rank 0, under the lock."""
        if not distributed.is_main() or not self.root.is_dir():
            return
        with writing(self.root):
            for name in (CONFIG_FILE, RESULTS_FILE, *REPORT_FILES):
                (self.root / name).unlink(missing_ok=True)
            for seed_dir in sorted(self._seed_dirs(), reverse=True):
                for name in SEED_FILES:
                    path = seed_dir / name
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink(missing_ok=True)
                for folder in (seed_dir, seed_dir.parent):
                    if folder != self.root and folder.is_dir() and not any(folder.iterdir()):
                        folder.rmdir()

    def _seed_dirs(self) -> list[Path]:
        found = [*self.root.glob("seed*"), *self.root.glob("shots*/seed*")]
        return [p for p in found if p.is_dir() and _SEED_DIR.fullmatch(p.relative_to(self.root).as_posix())]


_held: dict[str, int] = {}  # folders this process holds the lock of, with the nesting depth


def _locked(root: Path, command: str, *, shared: bool, check: Optional[Callable[[], None]],
            say: Callable[[str], None], create: Callable[[], None]) -> Iterator[None]:
    key = os.path.realpath(root)
    if key in _held:
        _held[key] += 1
        try:
            if check is not None:
                check()
            yield
        finally:
            _held[key] -= 1
        return
    lock = RunLock(root, command, shared=shared) if distributed.is_main() else None
    failure, note = None, None
    if lock is not None:
        try:
            create()
            note = lock.acquire()
            if check is not None:
                check()
        except BaseException as exc:
            lock.release()
            if not isinstance(exc, Exception) or not distributed.is_distributed():
                raise
            failure = exc
    shared_failure = distributed.share_from_main(_portable(failure))
    if failure is not None:
        raise failure
    if shared_failure is not None:
        raise shared_failure
    _held[key] = 1
    try:
        if note:
            say(note)
        with TerminateAsExit():
            yield
    finally:
        del _held[key]
        if lock is not None:
            lock.release()


def _portable(exc: Optional[BaseException]) -> Optional[Exception]:
    """rank 0's failure as something every rank can raise (a user's error as it is)."""
    if exc is None or isinstance(exc, FastpromptError):
        return exc
    return RuntimeError(f"rank 0 failed to take the run folder: {type(exc).__name__}: {exc}")


def read_json(path: Path) -> Optional[dict]:
    """A JSON object file's content; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------- eval keeps the record

# What training alone knows (how long it took, on what, with which config): an evaluation keeps
# these as training wrote them, and puts its own values of them under "eval".
TRAINING_RECORD = ("wall_seconds", "device", "config")


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def evaluated_result(previous: Optional[dict], result: dict) -> dict:
    """One seed's result.json after `fastprompt eval`: every field training wrote, the new
    accuracies over it, training's "train" record kept (the evaluation's, the checkpoint step it
    loaded, goes under "eval")."""
    if not isinstance(previous, dict) or previous.get("seed") != result.get("seed"):
        previous = {}
    loaded = result.get("train") or {}
    merged = {**previous, **result, "eval": {**loaded, "time": _now()}}
    if isinstance(previous.get("train"), dict) and previous["train"]:
        merged["train"] = previous["train"]
    return merged


def evaluated_results(previous: Optional[dict], results: dict) -> dict:
    """results.json after `fastprompt eval`: every field training wrote, the evaluation's numbers
    over it, training's own record (TRAINING_RECORD) kept; "eval" says when, on what, how long and
    which keys the evaluation changed."""
    if not isinstance(previous, dict):
        previous = {}
    own = {k: results[k] for k in TRAINING_RECORD if k in results}
    merged = {**previous, **results, **{k: previous[k] for k in TRAINING_RECORD if k in previous}}
    changed = config_changes(previous["config"], results["config"], frozenset()) \
        if isinstance(previous.get("config"), dict) and isinstance(results.get("config"), dict) else ""
    merged["eval"] = {"time": _now(), **{k: v for k, v in own.items() if k != "config"},
                      "changed": changed or "nothing"}
    return merged


# ---------------------------------------------------------------------- config compatibility


def flat_config(d: dict, prefix: str = "") -> dict:
    """A config dict as {"section.key": value} (method.options and optim.options stay one value)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "options":
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, current: dict, free: frozenset | set) -> str:
    """"key: old -> new, ..." for every key outside `free` that differs ("" when none does)."""
    a, b = flat_config(saved), flat_config(current)
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


def load_trained(model, seed_dir: str | Path, config: Optional[dict] = None, recorded: Optional[dict] = None) -> dict:
    """Load the newest checkpoint of seed_dir into model; returns its meta. For `fastprompt eval`.

    With `config` (the current config as a dict), a checkpoint trained with other values of keys
    that shape or train the model is refused with a ConfigError naming them, before loading; with
    `recorded` (the run folder's config.yaml) a checkpoint that disagrees with the folder's own
    config is named as such (copied from another run), not blamed on the overrides. A checkpoint
    from a training that stopped early (killed, interrupted) is refused: its accuracies would pass
    for the run's."""
    root = checkpoints_dir(seed_dir)
    if latest_checkpoint_dir(root) is None:
        raise CheckpointError(f"no checkpoint under {root}; train first (fastprompt train ...)")
    ckpt = load_checkpoint(root)
    trained = ckpt.meta.get("config")
    if isinstance(trained, dict):
        if recorded is not None:
            diffs = config_changes(trained, recorded, EVAL_FREE_KEYS)
            if diffs:
                raise ConfigError(
                    f"the checkpoint {ckpt.path} and this run folder's {CONFIG_FILE} disagree (checkpoint -> "
                    f"{CONFIG_FILE}: {diffs}): {CONFIG_FILE} was edited, or the checkpoint comes from another run. "
                    f"Restore {CONFIG_FILE} (the checkpoint's state.json records what it was trained with) or put "
                    "this run's own checkpoints back; to evaluate the other run, pass its folder")
        if config is not None:
            check_evaluable(trained, config, root)
        epochs = trained.get("train", {}).get("epochs")
        done = ckpt.meta.get("epoch")
        if isinstance(epochs, int) and isinstance(done, int) and (done < epochs or ckpt.meta.get("batch_in_epoch")):
            raise RunFolderError(
                f"{ckpt.path} is from a training that stopped after {done} of {epochs} epochs (step "
                f"{ckpt.meta.get('step')}): its accuracies would not be the run's. Finish it first with the same "
                "command and --resume (fastprompt train ... --resume), then evaluate")
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
