"""The evaluation protocols, one module each over one per-seed loop (`seeds.run_seeds`): base-to-new,
cross-dataset transfer and domain generalisation, few-shot, and plain train/test. `run_protocol`
runs the config's protocol end to end and writes the run folder's results.json."""
from __future__ import annotations

import time
from typing import Callable

from ..config import Config
from .base2new import run_base2new
from .few_shot import run_few_shot, run_train_eval
from .session import Say, Session, silent
from .transfer import run_transfer, set_target_classes

__all__ = ["PROTOCOLS", "run_protocol", "Session", "Say", "silent", "run_base2new", "run_transfer", "run_few_shot",
           "run_train_eval", "set_target_classes"]

PROTOCOLS: dict[str, Callable[[Session], dict]] = {
    "base2new": run_base2new,
    "cross_dataset": run_transfer,
    "domain_generalisation": run_transfer,
    "few_shot": run_few_shot,
    "train_eval": run_train_eval,
}


def run_protocol(cfg: Config, *, resume: bool = False, train: bool = True, say: Say = print,
                 session: type[Session] = Session) -> dict:
    """Run cfg.protocol end to end (every seed: train or load, evaluate); writes and returns the
    aggregate results. `session` chooses how models are built, trained and scored (the
    official-style baseline passes its own)."""
    opened = session.open(cfg, resume=resume, train=train, say=say)
    start = time.perf_counter()
    results = PROTOCOLS[cfg.protocol.name](opened)
    results["wall_seconds"] = round(time.perf_counter() - start, 2)
    results["device"] = opened.device_name()
    opened.folder.write_results(results)
    return results
