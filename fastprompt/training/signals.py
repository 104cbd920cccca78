"""SIGTERM and Ctrl-C during training: stop at the next step with a checkpoint, not mid-write."""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Optional

__all__ = ["StopSignals", "TrainingInterrupted"]


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT reached a training run; a checkpoint was written at `checkpoint` first."""

    def __init__(self, signum: int, checkpoint: Optional[Path]):
        self.signum, self.checkpoint = int(signum), checkpoint
        name = signal.Signals(self.signum).name
        super().__init__(f"{name} received: saved checkpoint {checkpoint}; rerun the same command with --resume "
                         "to continue exactly where it stopped")


class StopSignals:
    """While training, SIGTERM and SIGINT ask for a stop at the next step instead of killing the run.

    The loop then checkpoints and raises TrainingInterrupted. A second SIGINT (Ctrl-C twice) stops
    at once, as Ctrl-C normally does. Only the main thread may install handlers; elsewhere (a
    training thread in a notebook) signals keep their usual meaning.
    """

    def __init__(self):
        self.requested: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum

    def interrupted(self, checkpoint: Optional[Path]) -> TrainingInterrupted:
        """The exception to raise once the stop was honoured (a signal from another rank: SIGTERM)."""
        return TrainingInterrupted(self.requested or signal.SIGTERM, checkpoint)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
