"""The run-folder lock's rules (fastprompt.run_lock), each against a real second process or a
record written as a crashed holder leaves it: exclusive against any other process, shared against
shared, the stale-lock rule (same host: the PID is gone; another host: not renewed for 10 minutes),
the record-only mode of file systems without flock, and the record emptied on release."""
import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastprompt import run_lock
from fastprompt.errors import RunFolderInUseError
from fastprompt.run_folder import RunFolder
from fastprompt.run_lock import LOCK_FILE, STALE_AFTER_S, RunLock, in_use_error

HOLD = """
import sys, time
from fastprompt.run_folder import RunFolder
with RunFolder(sys.argv[1]).locked("holder test", shared=sys.argv[2] == "shared"):
    print("held", flush=True)
    sys.stdin.readline()
"""


class Holder:
    """A second process that holds `root`'s lock until it is told to let go."""

    def __init__(self, root: Path, shared: bool = False):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root), "shared" if shared else "exclusive"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        self.proc.communicate("go\n", timeout=60)
        assert self.proc.returncode == 0


def _record(**fields) -> dict:
    return {"pid": 1, "pid_start": None, "host": socket.gethostname(), "since": "2025-01-01 00:00:00 UTC",
            "command": "fastprompt train", **fields}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # exited and reaped: no process has this PID now (PIDs are not reused at once)


def test_exclusive_against_another_process_and_released_after(tmp_path):
    holder = Holder(tmp_path)
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert record["pid"] == holder.proc.pid and record["host"] == socket.gethostname()
    assert record["command"] == "holder test"
    for shared in (False, True):
        with pytest.raises(RunFolderInUseError) as err:
            with RunFolder(tmp_path).locked("second", shared=shared):
                pass
        assert f"is in use by PID {holder.proc.pid} on host {socket.gethostname()} since {record['since']}" \
            in str(err.value)
    assert "holder test" in str(in_use_error(tmp_path))  # the look that takes nothing sees it too
    holder.release()
    assert (tmp_path / LOCK_FILE).read_text().strip() == ""  # released: an empty record
    assert in_use_error(tmp_path) is None
    with RunFolder(tmp_path).locked("third"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_shared_holders_exclude_exclusive_ones_not_each_other(tmp_path):
    holder = Holder(tmp_path, shared=True)
    seed = tmp_path / "seed1"
    try:
        with RunFolder(tmp_path).locked("another resume", shared=True):
            with RunFolder(tmp_path).seed_locked(seed, "fastprompt train"):
                pass
        # An exclusive command names what the shared holders work on (here: a seed lock of this process).
        seed_lock = RunLock(seed, "fastprompt train")
        seed_lock.acquire()
        try:
            with pytest.raises(RunFolderInUseError) as err:
                RunLock(tmp_path, "fastprompt train --overwrite").acquire()
        finally:
            seed_lock.release()
        assert f"is in use by PID {os.getpid()} on host {socket.gethostname()}" in str(err.value)
        assert f"(fastprompt train) in {seed}" in str(err.value)
    finally:
        holder.release()


def test_a_record_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path):
    pid = _dead_pid()
    (tmp_path / LOCK_FILE).write_text(json.dumps(_record(pid=pid)))
    said = []
    with RunFolder(tmp_path).locked("after the crash", say=said.append):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert said == [f"took over the lock of {tmp_path}: PID {pid} on host {socket.gethostname()} since "
                    "2025-01-01 00:00:00 UTC (fastprompt train) ended without releasing it (killed or crashed); its "
                    "checkpoints are as it left them"]


def test_a_reused_pid_is_not_the_holder(tmp_path):
    # The record's PID runs again, but as another process (another start time): the holder is gone.
    (tmp_path / LOCK_FILE).write_text(json.dumps(_record(pid=os.getppid(), pid_start=1)))
    if run_lock._process_start(os.getppid()) in (None, 1):
        pytest.skip("no /proc start times here")
    with RunFolder(tmp_path).locked("after the crash", say=lambda m: None):
        pass


@pytest.mark.parametrize("age, refused", [(60.0, True), (STALE_AFTER_S + 60, False)])
def test_a_record_from_another_host_counts_until_it_is_not_renewed(tmp_path, age, refused):
    # flock cannot see a process on another machine when the mount keeps locks per machine: a record
    # renewed within STALE_AFTER_S refuses the folder, an older one is abandoned.
    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps(_record(pid=4242, host="node-elsewhere")))
    os.utime(lock, (time.time() - age, time.time() - age))
    if refused:
        with pytest.raises(RunFolderInUseError) as err:
            with RunFolder(tmp_path).locked("x"):
                pass
        assert "PID 4242 on host node-elsewhere" in str(err.value) and "renewed 60 s ago" in str(err.value)
        assert f"delete {lock}" in str(err.value)
    else:
        with RunFolder(tmp_path).locked("x", say=lambda m: None):
            pass


def test_without_flock_the_record_is_the_lock(tmp_path, monkeypatch):
    # Some file systems (Lustre without -o flock) refuse flock: the record alone decides, also for a
    # shared lock (taken as exclusive), with the same stale rule.
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    monkeypatch.setattr(run_lock, "_VERIFY_S", 0.01)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = _record(pid=live.pid, pid_start=run_lock._process_start(live.pid))
        (tmp_path / LOCK_FILE).write_text(json.dumps(record))
        for shared in (False, True):
            with pytest.raises(RunFolderInUseError, match=f"PID {live.pid} on host"):
                with RunFolder(tmp_path).locked("x", shared=shared):
                    pass
    finally:
        live.kill()
        live.wait()
    with RunFolder(tmp_path).locked("x", shared=True, say=lambda m: None):  # the holder is gone: stale
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (tmp_path / LOCK_FILE).read_text().strip() == ""


def test_nested_use_in_one_process_holds_one_lock(tmp_path):
    folder = RunFolder(tmp_path)
    with folder.locked("sweep", shared=True):
        with folder.locked("protocol"):
            assert (tmp_path / LOCK_FILE).is_file()
        probe = RunLock(tmp_path, "other")  # another holder (another open file) is still refused
        with pytest.raises(RunFolderInUseError):
            probe.acquire()


def test_a_folder_that_is_a_file_or_cannot_be_made(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        with RunFolder(target).locked("x"):
            pass
    with pytest.raises(OSError, match=f"cannot write {target / 'run'}: {target} is a file, not a folder"):
        with RunFolder(target / "run").locked("x"):
            pass
    assert target.read_text() == "mine"
