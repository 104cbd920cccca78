"""The evaluation protocols, one module each over one per-seed loop (`seeds.run_seeds`): base-to-new,
cross-dataset transfer and domain generalisation, few-shot, and plain train/test. `run_protocol`
runs the config's protocol end to end and writes the run folder's results.json."""
from __future__ import annotations

import time
from typing import Callable

from ..config import Config
from ..run_folder import RunFolder
from .base2new import run_base2new
from .few_shot import run_few_shot, run_train_eval
from .session import Say, Session, check_data_root, silent
from .transfer import run_transfer, set_target_classes

__all__ = ["PROTOCOLS", "run_protocol", "Session", "Say", "silent", "check_data_root", "run_base2new", "run_transfer",
           "run_few_shot", "run_train_eval", "set_target_classes"]

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
    official-style baseline passes its own). The run folder is locked for the whole run (a caller
    that holds it already, fastprompt.train or a sweep, keeps holding it)."""
    command = "fastprompt train" if train else "fastprompt eval"
    with RunFolder(cfg.output_dir).locked(command, shared=train and resume, say=say):
        session.method_options_of(cfg)  # the config's own mistakes first,
        check_data_root(cfg)  # then a wrong data.root: before the backbone (a weights download), not after it
        opened = session.open(cfg, resume=resume, train=train, say=say)
        start = time.perf_counter()
        results = PROTOCOLS[cfg.protocol.name](opened)
        results["wall_seconds"] = round(time.perf_counter() - start, 2)
        results["device"] = opened.device_name()
        return opened.folder.write_results(results, evaluation=not train)
