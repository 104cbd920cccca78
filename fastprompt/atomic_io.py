"""Atomic file writes: readers (and a run killed at any moment) see the old file or the whole new
one, never a partial one. The one helper every writer of run files uses.

A write that fails (read-only folder, a parent that is a file, disk full, no permission) raises
WriteError: "cannot write PATH: reason" and what to do, one line for the command to print, instead
of the operating system's OSError and its traceback.
"""
from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import WriteError

__all__ = ["atomic_write_bytes", "fsync_dir", "ensure_dir", "writing", "cannot_write", "WRITE_ONLY_ERRNOS"]

# Errors only a write can raise: the command may name them as write failures wherever they come from.
WRITE_ONLY_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _blocking_file(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` (or path itself) that is not a folder, if any."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return None if p.is_dir() else p
    return None


def cannot_write(path: str | Path, exc: OSError) -> WriteError:
    """The WriteError for `exc`, raised while writing `path`."""
    path = Path(path)
    code = exc.errno
    blocker = _blocking_file(path) if code in (errno.ENOTDIR, errno.EEXIST) else None
    if blocker is not None:
        reason = f"{blocker} is a file, not a folder"
    else:
        reason = exc.strerror or str(exc)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free some space there (or raise the quota), or write somewhere else"
    elif blocker is not None:
        fix = "choose a path whose folders are folders"
    else:
        fix = "make it writable, or write somewhere else"
    return WriteError(f"cannot write {path}: {reason}; {fix}", code, str(path))


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an OSError raised inside into WriteError("cannot write `path`: ...")."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        raise cannot_write(path, exc) from exc


def ensure_dir(path: str | Path) -> Path:
    """Create the folder `path` (and its parents) if needed; WriteError when it cannot be."""
    path = Path(path)
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (POSIX: the directory entry is flushed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a unique hidden temp file in the same folder (fsynced, then
    renamed over `path`); the temp file is removed if anything fails before the rename, and the
    old `path` is then untouched. WriteError when it cannot be written."""
    path = Path(path)
    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)
