"""The errors fastprompt raises for problems a user can fix: one base, one subclass per kind.

Every message says what was wrong and how to fix it. The `fastprompt` command prints a
FastpromptError as one line (exit code 2) and lets anything else raise with its traceback: an
error outside this family is a bug, and its traceback is what a bug report needs.

Each subclass also derives from the built-in exception Python code caught before this base existed
(`except ValueError` around a config or a dataset, `except FileNotFoundError` around a weights
file, ...), so such callers keep working.
"""
from __future__ import annotations

__all__ = [
    "FastpromptError",
    "ConfigError",
    "DatasetError",
    "ModelError",
    "ClassNamesError",
    "MissingFileError",
    "CheckpointError",
    "RunFolderError",
    "RunFolderInUseError",
    "WriteError",
    "ResultsError",
    "DivergenceError",
]


class FastpromptError(Exception):
    """A problem with what the user asked for or gave; the message names it and the fix."""


class ConfigError(FastpromptError, ValueError):
    """A configuration key or value (file, `key=value` override, command-line option) to fix."""


class DatasetError(FastpromptError, ValueError):
    """A dataset on disk does not match its expected layout, or one of its files is unreadable.

    The message names the offending path and, where a layout is involved, shows the tree that was
    expected (docs/datasets.md describes every layout).
    """


class ModelError(FastpromptError, ValueError):
    """A backbone that cannot be built as asked: unknown model name or pretrained tag, a weights
    file that does not fit the model, weights that cannot be fetched."""


class ClassNamesError(FastpromptError, ValueError):
    """A class list that cannot be prompted faithfully: a name given twice, names whose prompts
    tokenize identically, or prompts longer than the text encoder's context."""


class MissingFileError(FastpromptError, FileNotFoundError):
    """A file the user named (weights, results) does not exist."""


class CheckpointError(FastpromptError, RuntimeError):
    """A checkpoint that is missing, truncated or tampered with; the message names the file."""


class RunFolderError(FastpromptError, ValueError):
    """A run folder that cannot be used as asked: not a run folder, or one that already holds a run
    a fresh `train` would replace."""


class RunFolderInUseError(RunFolderError):
    """Another process holds the run folder's lock (a train, eval or sweep running in it); the
    message names that process: its PID, host and start time."""


class WriteError(FastpromptError, OSError):
    """A file or folder could not be written (read-only, not a folder, disk full, no permission):
    "cannot write PATH: reason". Whatever was there before is left as it was. `errno` is the
    operating system's error number."""

    def __init__(self, message: str, errno: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.errno, self.filename = errno, filename

    def __str__(self) -> str:  # OSError's own would show "[Errno N] ..." instead of the message
        return self.args[0]


class ResultsError(FastpromptError, ValueError):
    """A results file (results.json, a benchmark's JSON) that is damaged or of another kind."""


class DivergenceError(FastpromptError, FloatingPointError):
    """Training diverged (inf/NaN loss or weights); the run stopped before saving anything from it."""
