"""What a run writes as it trains: train.log, metrics.jsonl (and TensorBoard when installed), and
the progress bar on a terminal."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from .. import distributed
from ..atomic_io import ensure_dir, writing
from ..run_folder import METRICS_FILE, TRAIN_LOG

__all__ = ["RunLogger", "progress_bar"]


class _FileHandler(logging.FileHandler):
    """A log file whose write errors (disk full) reach the run instead of being printed and dropped."""

    def handleError(self, record) -> None:
        raise  # inside emit's except: the OSError being handled


class RunLogger:
    """A run's log file, JSONL metrics and (when installed) TensorBoard, appended across resumes."""

    def __init__(self, run_dir: Path, *, name: str = "fastprompt"):
        self.metrics_path = run_dir / METRICS_FILE
        self.log_path = run_dir / TRAIN_LOG
        self.log = logging.getLogger(f"{name}.{run_dir.resolve()}")
        self.log.setLevel(logging.INFO)
        self.log.propagate = False
        # Under torchrun only rank 0 writes the run's files; the other ranks' loggers are silent.
        self.enabled = distributed.is_main()
        self.tb = None
        if not self.enabled:
            self.log.disabled = True
            return
        ensure_dir(run_dir)
        if not self.log.handlers:
            with writing(self.log_path):
                handler = _FileHandler(self.log_path)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            self.log.addHandler(handler)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def info(self, msg: str) -> None:
        with writing(self.log_path):
            self.log.info(msg)

    def warning(self, msg: str) -> None:
        with writing(self.log_path):
            self.log.warning(msg)

    def metrics(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with writing(self.metrics_path), open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time", "epoch"):
                    self.tb.add_scalar(f"{record.get('event', 'train')}/{key}", value, record["step"])

    def close(self) -> None:
        for handler in list(self.log.handlers):
            handler.close()
            self.log.removeHandler(handler)
        if self.tb is not None:
            self.tb.close()


def progress_bar(enabled: bool, *, total: int, initial: int = 0, desc: str):
    """A tqdm bar counting images (its rate is images/s, its ETA the whole run's), on a terminal
    only: in a CI log bars are noise (the log file and metrics.jsonl carry the numbers)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img",
                disable=not (enabled and distributed.is_main() and sys.stderr.isatty()),
                dynamic_ncols=True, leave=False, file=sys.stderr)
