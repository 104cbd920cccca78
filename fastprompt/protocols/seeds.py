"""The per-seed loop every protocol runs: skip a finished seed, else run it and record its result."""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from ..data import DatasetSplits
from ..run_folder import RESULT_FILE, evaluated_result, read_json, write_json
from .session import Session

__all__ = ["run_seeds", "trained_model"]


def run_seeds(session: Session, keys: tuple[str, ...], run_seed: Callable[[int, object], dict],
              describe: Callable[[dict], str], *, shots: Optional[int] = None) -> list[dict]:
    """For each seed of data.seeds, in its own folder (`shots<k>/seed<s>` when `shots` is given):
    reuse it when finished (--resume: a complete result.json holding `keys`, same config), else
    `run_seed(seed, seed_dir)`, write its result.json and say `describe(result)`. An evaluation
    (`fastprompt eval`) keeps what training wrote in result.json."""
    runs = []
    for seed in session.cfg.data.seeds:
        seed_dir = session.seed_dir(seed, shots=shots)
        with session.folder.seed_locked(seed_dir, "fastprompt " + ("train" if session.train else "eval"),
                                        say=session.say):
            result = session.finished(seed_dir, seed, keys)
            if result is None:
                result = run_seed(seed, seed_dir)
                if not session.train:  # `fastprompt eval`: the new accuracies, training's record kept
                    result = evaluated_result(read_json(seed_dir / RESULT_FILE), result)
                write_json(seed_dir / RESULT_FILE, result)
                session.say(describe(result))
        runs.append(result)
    return runs


def trained_model(session: Session, classnames: list[str], train: DatasetSplits, seed: int,
                  seed_dir) -> tuple[nn.Module, dict]:
    """A model for `classnames`, initialised from `seed` and trained on `train.train` (or loaded
    from seed_dir's checkpoint by `fastprompt eval`); with its training stats."""
    model = session.build_model(classnames, seed)
    return model, session.train_model(model, train.train, seed_dir, seed)
