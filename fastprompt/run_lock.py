"""The lock that gives one process at a time a run folder: `<output_dir>/.fastprompt.lock`.

Every command that works in a run folder holds it from before its first look at the folder until
it exits, so two commands never write the same files: the second is refused with "in use by PID N
on host H since T". A command that starts, replaces or evaluates the whole run (`train`,
`--overwrite`, `eval`, `demo`) holds it exclusively. One that continues it (`--resume`, a sweep's
folder) holds it shared and locks each seed's folder exclusively while it works on that seed: a
scheduler's per-seed jobs (`sweep --emit-commands`) run side by side in one folder, two jobs never
run one seed, and nothing exclusive starts while any of them runs.

How it holds:

* An exclusive `flock` on the lock file. The kernel releases it whenever the process ends, also when
  it is killed (SIGKILL, OOM killer, power loss on a local disk): a crash cannot leave a folder
  locked on the machine it ran on.
* A record in the file, for the error message and for the cases `flock` cannot cover: the holder's
  PID, process start time, host and start date, renewed (the file's mtime) every HEARTBEAT_S
  seconds while it is held, and emptied on release.
* The stale-lock rule, for a record left behind by a holder that ended without releasing (killed):
  on the same host the record is stale as soon as that PID no longer runs (or is another process
  now); from another host it is stale once it has not been renewed for STALE_AFTER_S seconds, since
  a dead process on another machine cannot be seen from here.

On a shared file system (NFS, Lustre, GPFS, ...) seen by several machines: Linux NFS clients send
`flock` to the server as a whole-file lock (unless mounted with local_lock=flock/all or nolock), and
the server releases a crashed client's lock when its lease expires (NFSv4: typically 90 s). Where
`flock` is not supported at all (some Lustre mounts) the record alone decides, with the same rules
and a write-then-verify step. Where `flock` is silently local (the mount options above), the
record still refuses a second machine while the first one renews it. The same host is always
decided exactly; another host within STALE_AFTER_S of a crash is refused (conservatively).

Shared holders write no record (several may hold the lock); an exclusive command they block names
the holders of the seed locks below the folder. Without `flock` the record is the lock, and a
shared lock is taken as an exclusive one.

Under torchrun only rank 0 takes the lock; the other ranks learn its outcome from rank 0 (see
RunFolder.locked), so every rank refuses or proceeds together.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from .atomic_io import ensure_dir, writing
from .errors import RunFolderInUseError

try:  # POSIX; elsewhere the record alone decides
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["LOCK_FILE", "HEARTBEAT_S", "STALE_AFTER_S", "RunLock", "in_use_error"]

LOCK_FILE = ".fastprompt.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
_VERIFY_S = 0.5  # record-only mode: how long a writer waits before checking its record is still there
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _process_start(pid: int) -> Optional[int]:
    """When `pid` started (clock ticks since boot, Linux), to tell a reused PID from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _pid_alive(pid: int, start: Optional[int]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    now = _process_start(pid)
    return start is None or now is None or now == start


def _describe(record: dict) -> str:
    return (f"PID {record.get('pid', '?')} on host {record.get('host', '?')} since {record.get('since', '?')}"
            + (f" ({record['command']})" if record.get("command") else ""))


def _read_record(path: Path) -> tuple[dict, float]:
    """(record, mtime) of a lock file; ({}, 0) when empty or unreadable."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        return (json.loads(text) if text else {}), path.stat().st_mtime
    except (OSError, ValueError):
        return {}, 0.0


def _live(record: dict, mtime: float) -> bool:
    """Whether the record's holder may still run (the stale-lock rule)."""
    if not record.get("pid"):
        return False
    if record.get("host") == socket.gethostname():
        return _pid_alive(int(record["pid"]), record.get("pid_start"))
    return time.time() - mtime < STALE_AFTER_S


class RunLock:
    """A process-wide lock on one folder (see the module docstring): exclusive, or `shared` (the
    holders of a shared lock exclude exclusive ones, not each other; they lock what they write below
    it exclusively, e.g. each seed's folder).

    acquire() raises RunFolderInUseError naming the holder, or WriteError when the lock file cannot
    be created; it returns a note when it took over a stale record (else None). release() is
    idempotent. Use RunFolder.locked() rather than this class directly.
    """

    def __init__(self, root: str | Path, command: str, *, shared: bool = False):
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self.command = command
        self.shared = shared
        self._fd: Optional[int] = None
        self._writes_record = not shared
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ the record

    def _own_record(self) -> dict:
        pid = os.getpid()
        return {"pid": pid, "pid_start": _process_start(pid), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": self.command}

    def _read(self) -> dict:
        try:
            text = os.pread(self._fd, 65536, 0).decode("utf-8", "replace").strip()
            return json.loads(text) if text else {}
        except (OSError, ValueError):
            return {}

    def _mtime(self) -> float:
        try:
            return os.fstat(self._fd).st_mtime
        except OSError:
            return time.time()

    def _write(self, record: dict) -> None:
        data = (json.dumps(record) + "\n").encode()
        with writing(self.path):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
            os.fsync(self._fd)

    def _is_ours(self, record: dict) -> bool:
        return record.get("pid") == os.getpid() and record.get("host") == socket.gethostname()

    def _holders_below(self) -> list[dict]:
        """Live records of the locks inside this folder (the seeds that shared holders work on)."""
        found = []
        for path in sorted(self.root.rglob(LOCK_FILE)):
            if path != self.path:
                record, mtime = _read_record(path)
                if _live(record, mtime):
                    found.append({**record, "where": str(path.parent)})
        return found

    def _in_use(self, record: dict) -> RunFolderInUseError:
        if record:
            holder, renewed = _describe(record), ""
            if record.get("host") != socket.gethostname():
                age = max(0.0, time.time() - self._mtime())
                renewed = (f"; its lock was renewed {age:.0f} s ago and counts as abandoned {STALE_AFTER_S:.0f} s "
                           f"after the last renewal (or delete {self.path} once that process is gone)")
        else:
            below = self._holders_below()
            renewed = ""
            holder = ("; ".join(f"{_describe(r)} in {r['where']}" for r in below) if below else
                      "another fastprompt command (one that continues it: --resume or a sweep, between seeds)")
        return RunFolderInUseError(
            f"run folder {self.root} is in use by {holder}{renewed}. Wait for it to finish (or stop it), or use "
            "another output_dir=... (docs/run-folders.md)")

    # ------------------------------------------------------------------ acquire / release

    def acquire(self) -> Optional[str]:
        ensure_dir(self.root)
        with writing(self.path):
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            return self._take()
        except BaseException:
            self._close()
            raise

    def _take(self) -> Optional[str]:
        flocked = False
        if fcntl is not None:
            try:
                fcntl.flock(self._fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                flocked = True
            except BlockingIOError:
                raise self._in_use(self._read_settled()) from None
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
        self._writes_record = not (self.shared and flocked)  # without flock the record is the lock: exclusive
        previous = self._read()
        if previous and not self._is_ours(previous) and _live(previous, self._mtime()):
            raise self._in_use(previous)
        if not self._writes_record:  # shared: no record of its own; a stale one is cleared
            if previous:
                self._write({})
        else:
            self._write(self._own_record())
            if not flocked:  # no kernel lock: a writer that raced us in the same instant must lose, or we must
                time.sleep(_VERIFY_S)
                now = self._read()
                if not self._is_ours(now):
                    raise self._in_use(now)
            self._beat = threading.Thread(target=self._heartbeat, name="fastprompt-run-lock", daemon=True)
            self._beat.start()
        if previous and not self._is_ours(previous):
            return (f"took over the lock of {self.root}: {_describe(previous)} ended without releasing it "
                    "(killed or crashed); its checkpoints are as it left them")
        return None

    def _read_settled(self) -> dict:
        """The holder's record; an exclusive holder writes it right after taking the lock, so give
        it a moment (shared holders write none)."""
        for _ in range(10):
            record = self._read()
            if record:
                return record
            time.sleep(0.05)
        return {}

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self._fd)
            except OSError:
                pass  # a failing disk shows up in the run's own writes

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self._writes_record:
            try:  # an empty record: released, not abandoned
                os.ftruncate(self._fd, 0)
                os.fsync(self._fd)
            except OSError:
                pass
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # also drops the flock
            self._fd = None


def in_use_error(root: str | Path) -> Optional[RunFolderInUseError]:
    """The error naming who holds `root` exclusively right now, or None; takes nothing (a look
    before a command that only reads the folder, e.g. eval finding no config.yaml yet)."""
    path = Path(root) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return None
    probe = RunLock(root, "", shared=True)
    try:
        probe._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        fcntl.flock(probe._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return probe._in_use(probe._read_settled())
    except OSError:
        return None
    finally:
        probe._close()
    return None


class TerminateAsExit:
    """While a lock is held, SIGTERM outside training (which has its own handler) exits through
    Python's cleanup (exit code 143) so the lock is released and its record emptied, instead of the
    default immediate death. Installed only in the main thread and only over the default handler."""

    def __init__(self):
        self._previous = None

    def __enter__(self) -> "TerminateAsExit":
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._previous = signal.signal(signal.SIGTERM, self._exit)
        return self

    @staticmethod
    def _exit(signum, frame):
        print(f"\n{signal.Signals(signum).name} received: stopped", file=sys.stderr)
        raise SystemExit(128 + signum)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
