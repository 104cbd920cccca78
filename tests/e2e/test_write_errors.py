"""Writes that fail: a read-only run folder, an output_dir below a file, a disk that fills up, a
read-only `report --out`. Each is one line, "cannot write PATH: reason; what to do", and every file
written before is left as it was."""
import os
import resource
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from fastprompt.cli import main
from tiny_runs import REPO, snapshot as _snapshot, train_argv


_train = train_argv


def _cannot_write(capsys, argv, path) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastprompt {argv[0]}: error: cannot write {path}") and "Traceback" not in err, err
    assert err.count("\n") == 1
    return err


@contextmanager
def read_only(path: Path):
    """`path` (and what is inside) unwritable for this process: by permissions, or for root (whom
    permissions do not stop) as a read-only bind mount."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield "Permission denied"
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    mounted = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("running as root without permission to mount: cannot make a folder read-only")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield "Read-only file system"
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture(scope="module")
def trained(digits_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(_train(digits_root, out)) == 0
    return out


def test_a_read_only_run_folder(trained, tmp_path, digits_root, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = _snapshot(run)
    with read_only(run) as reason:
        for argv in (_train(digits_root, run, "--overwrite"), ["eval", str(run)], _train(digits_root, run, "--resume")):
            err = _cannot_write(capsys, argv, run / ".fastprompt.lock")
            assert reason in err and "make it writable, or write somewhere else" in err
        err = _cannot_write(capsys, _train(digits_root, run / "new"), run / "new")  # a new run below it
        assert reason in err
        err = _cannot_write(capsys, ["report", str(run), "--out", str(run)], run / "report.md")
        assert reason in err
    assert _snapshot(run) == before


def test_an_output_dir_below_a_file(tmp_path, digits_root, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    err = _cannot_write(capsys, _train(digits_root, notes / "run"), notes / "run")
    assert f"{notes} is a file, not a folder; choose a path whose folders are folders" in err
    err = _cannot_write(capsys, _train(digits_root, tmp_path / "r", f"data.cache_dir={notes}"), notes)
    assert notes.read_text() == "mine"


def test_report_out_is_a_file_or_read_only(trained, tmp_path, capsys):
    target = tmp_path / "report.md"
    target.write_text("mine")
    assert main(["report", str(trained), "--out", str(target)]) == 2
    assert f"--out {target} is a file" in capsys.readouterr().err and target.read_text() == "mine"


def _fill_up(limit_bytes: int):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return limit


def test_a_disk_that_fills_up(trained, tmp_path, digits_root):
    # Every file this process writes may grow to 8 KB only: the first larger write fails as on a
    # full disk. The run stops with one line and leaves no half-written file behind.
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "fastprompt", *_train(digits_root, out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, preexec_fn=_fill_up(8 * 1024))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("fastprompt train: error: cannot write ") and "File too large" in line, line
    assert "free some space there" in line and "Traceback" not in proc.stderr
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]
    assert leftovers == []
    assert not (out / "results.json").exists()


def test_a_real_full_disk(tmp_path, digits_root, capsys):
    # A small tmpfs: the run stops at its first write that does not fit, with one line.
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root (test_a_disk_that_fills_up covers the rest)")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        assert main(_train(digits_root, disk / "run")) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fastprompt train: error: cannot write {disk / 'run'}") and "Traceback" not in err
        assert "No space left on device; free some space there" in err and err.count("\n") == 1
        assert [p for p in disk.rglob("*") if ".tmp" in p.name] == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)
