"""Checkpoints that hold only what trains, written so a crash can never leave a broken one.

Layout under a run's `checkpoints/` folder:

    step-00000120/model.safetensors     trainable tensors only (model.state_dict()), never frozen CLIP
    step-00000120/trainer.safetensors   optimiser state tensors and RNG states
    step-00000120/state.json            step, epoch, scheduler, scaler, the resolved config, and the
                                        sha256 of both tensor files
    latest                              the name of the newest complete checkpoint folder

A checkpoint folder is written under a temporary name, every file fsynced, then renamed into place;
only then does `latest` move (itself written to a temp file and os.replace'd). A kill at any moment
leaves the previous checkpoint intact and named by `latest`. Nothing is ever unpickled: tensors come
from safetensors and everything else from JSON. state.json also carries a digest of its own content,
so an edited step or config is refused like a damaged tensor file.

Test hook: FASTPROMPT_FAULT=<point>:<n> SIGKILLs the process the n-th time a save reaches <point>
(`tensors`: between the two tensor files, `rename`: all files written, before the folder is renamed
into place, `latest`: renamed, before `latest` moves), so tests can kill a real run mid-write.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .atomic_io import atomic_write_bytes, writing
from .atomic_io import fsync_dir as _fsync_dir
from .errors import CheckpointError

__all__ = [
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint_dir",
    "optimizer_state_to_flat",
    "optimizer_state_from_flat",
]

MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.safetensors"
STATE_FILE = "state.json"
LATEST_FILE = "latest"


_fault_hits: dict[str, int] = {}


def _fault_point(point: str) -> None:
    spec = os.environ.get("FASTPROMPT_FAULT", "")
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _fault_hits[point] = _fault_hits.get(point, 0) + 1
    if _fault_hits[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup, no finally blocks


def _state_digest(state: dict) -> str:
    # Over the parsed content (canonical JSON), so the file's whitespace does not matter.
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_FIX = ("restore the folder from a backup, or delete {root} to train this run again from scratch "
        "(other runs are unaffected)")


@dataclass
class Checkpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    trainer_tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def _write_synced(path: Path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors needs contiguous, non-aliased CPU tensors.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_checkpoint(
    root: str | Path,
    *,
    step: int,
    model_state: dict[str, torch.Tensor],
    trainer_tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    keep_last: int = 1,
) -> Path:
    """Write checkpoint `step-<step>` under `root` atomically and point `latest` at it. A write that
    fails (disk full, read-only) raises WriteError and leaves the earlier checkpoints as they were."""
    root = Path(root)
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    with writing(final):
        try:
            _write_checkpoint(root, tmp, final, step=step, model_state=model_state, trainer_tensors=trainer_tensors,
                              meta=meta)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # `latest` still names the previous checkpoint
            raise
    _fault_point("latest")
    atomic_write_bytes(root / LATEST_FILE, name.encode())
    _prune(root, keep=max(keep_last, 1), current=name)
    return final


def _write_checkpoint(root: Path, tmp: Path, final: Path, *, step: int, model_state: dict, trainer_tensors: dict,
                      meta: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    checksums = {MODEL_FILE: _write_synced(tmp / MODEL_FILE, st_save(_cpu_tensors(model_state)))}
    _fault_point("tensors")
    checksums[TRAINER_FILE] = _write_synced(tmp / TRAINER_FILE, st_save(_cpu_tensors(trainer_tensors)))
    state = dict(meta, step=step, sha256=checksums)
    state["state_sha256"] = _state_digest(state)
    _write_synced(tmp / STATE_FILE, json.dumps(state, indent=1, sort_keys=True).encode())
    _fsync_dir(tmp)
    _fault_point("rename")
    if final.exists():  # re-saving a step (e.g. after a resume): swap the old one out first
        trash = root / f".{final.name}.old-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)


def _prune(root: Path, keep: int, current: str) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*"):  # leftovers of a write that was killed
        if f"-{os.getpid()}" not in stale.name:
            shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint_dir(root: str | Path) -> Path | None:
    """The folder `latest` names, or None when no checkpoint was completed under `root`."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not name.startswith("step-") or "/" in name or not path.is_dir():
        raise CheckpointError(f"{pointer} names '{name}', but {path} does not exist or is not a checkpoint folder; "
                              + _FIX.format(root=root))
    return path


def _read_verified(path: Path, expected: str | None) -> bytes:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}; " + _FIX.format(root=path.parent.parent))
    data = path.read_bytes()
    if not isinstance(expected, str):
        raise CheckpointError(f"{path.parent / STATE_FILE} records no sha256 for {path.name}, so {path} cannot "
                              "be verified; " + _FIX.format(root=path.parent.parent))
    if hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(
            f"checkpoint file {path} does not match the checksum recorded in {path.parent / STATE_FILE} "
            "(truncated or modified); " + _FIX.format(root=path.parent.parent)
        )
    return data


def _parse_tensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except Exception as exc:  # safetensors raises its own error type for a malformed header
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); "
                              + _FIX.format(root=path.parent.parent)) from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint folder (or a `checkpoints/` root, following `latest`), verifying checksums."""
    path = Path(path)
    if (path / LATEST_FILE).is_file():
        path = latest_checkpoint_dir(path)
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"not a fastprompt checkpoint (no {STATE_FILE}): {path}")
    try:
        meta = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{state_path} is not valid JSON ({exc}); " + _FIX.format(root=path.parent)) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), dict):
        raise CheckpointError(f"{state_path} holds no checksums: not a fastprompt checkpoint, or edited; "
                              + _FIX.format(root=path.parent))
    if "state_sha256" in meta and meta["state_sha256"] != _state_digest(meta):
        raise CheckpointError(f"{state_path} was modified after it was written (its digest does not match); "
                              + _FIX.format(root=path.parent))
    sums = meta["sha256"]
    model_state = _parse_tensors(_read_verified(path / MODEL_FILE, sums.get(MODEL_FILE)), path / MODEL_FILE)
    trainer_tensors = _parse_tensors(_read_verified(path / TRAINER_FILE, sums.get(TRAINER_FILE)), path / TRAINER_FILE)
    return Checkpoint(path=path, model_state=model_state, trainer_tensors=trainer_tensors, meta=meta)


# ----------------------------------------------------------------- optimiser state <-> flat form


def optimizer_state_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into named tensors (for safetensors) and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state_from_flat(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """Inverse of optimizer_state_to_flat: a dict ready for optimizer.load_state_dict()."""
    per_param: dict[int, dict] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, idx, key = name.split(".", 2)
        per_param.setdefault(int(idx), {})[key] = value
    for idx, values in rest.get("scalars", {}).items():
        per_param.setdefault(int(idx), {}).update(values)
    # JSON turned tuples (AdamW's betas) into lists; torch optimisers expect the tuples back.
    groups = [
        {k: tuple(v) if isinstance(v, list) and k not in ("params", "param_names") else v for k, v in g.items()}
        for g in rest["param_groups"]
    ]
    return {"state": per_param, "param_groups": groups}
