"""One process at a time in a run folder, with real concurrent processes: two trainings started
together, `--overwrite` and `eval` while another process trains, a killed holder, torchrun. The
folder stays one run's: its config.yaml, checkpoint and results agree, and it can be evaluated and
resumed afterwards."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fastprompt.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "smoke.yaml")
RUN = ["model.name=fastprompt-tiny", "model.pretrained=null", "data.dataset=imagefolder", "data.seeds=[1]",
       "data.shots=2", "train.epochs=2", "train.batch_size=4", "train.precision=fp32", "train.device=cpu",
       "train.num_workers=0", "train.progress=false"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
IN_USE = "is in use by PID"


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastprompt", *args]


def _train(digits_root, out, *extra) -> list[str]:
    return _cmd("train", CONFIG, *RUN, f"data.root={digits_root}", f"output_dir={out}", *extra)


def _start(argv) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(argv, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def _holding(proc: subprocess.Popen, lock: Path, timeout: float = 240) -> dict:
    """Wait until `proc` has written its record into `lock`; the record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.is_file() and lock.read_text().strip():
            record = json.loads(lock.read_text())
            if record.get("pid") == proc.pid:
                return record
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"{proc.pid} never took {lock}")


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def _assert_one_run(out: Path, lr: float, epochs: int) -> None:
    """config.yaml, the checkpoint, results.json and the log are all the same run's."""
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == lr
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["optim"]["lr"] == lr and results["config"]["train"]["epochs"] == epochs
    ckpt = load_checkpoint(out / "seed1" / "checkpoints")
    assert ckpt.meta["config"]["optim"]["lr"] == lr and ckpt.meta["epoch"] == epochs
    log = (out / "seed1" / "train.log").read_text()
    assert log.count(" training ") == 1, log  # one training wrote the log, not two interleaved
    assert (out / ".fastprompt.lock").read_text().strip() == ""  # released


def test_overwrite_and_eval_while_another_process_trains_are_refused_naming_it(tmp_path, digits_root):
    out = tmp_path / "run"
    holder = _start(_train(digits_root, out, "train.epochs=3"))
    record = _holding(holder, out / ".fastprompt.lock")
    os.kill(holder.pid, signal.SIGSTOP)  # it holds the folder for as long as the others try
    try:
        overwrite = _run(_train(digits_root, out, "--overwrite", "optim.lr=0.01", "train.epochs=150"))
        evaluate = _run(_cmd("eval", str(out)))
        ranks = _torchrun(_train(digits_root, out, "--overwrite")[3:])
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    stdout, stderr = holder.communicate(timeout=300)
    assert holder.returncode == 0, stderr[-3000:]
    message = (f"run folder {out} is in use by PID {holder.pid} on host {socket.gethostname()} since "
               f"{record['since']} (fastprompt train)")
    for refused in (overwrite, evaluate):  # (--resume, shared, against it: tests/test_run_lock.py)
        assert message in _one_error_line(refused)
    if ranks is not None:  # under torchrun rank 0 takes the lock and every rank stops with its message
        ours = ranks.stderr.split("torch/distributed/elastic")[0]
        assert ranks.returncode != 0 and "Traceback" not in ours
        for rank in (0, 1):
            assert f"fastprompt train: error (rank {rank}): {message}" in ours, ours[-3000:]
    _assert_one_run(out, lr=0.05, epochs=3)
    again = _run(_train(digits_root, out, "train.epochs=3", "--resume"))  # the folder is usable afterwards
    assert again.returncode == 0 and "finished earlier" in again.stdout


def _torchrun(args: list[str]):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        return None
    return subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "fastprompt", *args], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=240)


def test_two_trainings_started_together_leave_one_run(tmp_path, digits_root):
    out = tmp_path / "run"
    first, second = _start(_train(digits_root, out)), _start(_train(digits_root, out, "optim.lr=0.01"))
    done = [(p, *p.communicate(timeout=300)) for p in (first, second)]
    codes = sorted(p.returncode for p, _, _ in done)
    assert codes == [0, 2], [(p.returncode, err[-2000:]) for p, _, err in done]
    (winner, _, _), (loser, _, loser_err) = sorted(done, key=lambda d: d[0].returncode)
    line = loser_err.strip().splitlines()[-1]
    # Refused while the winner trains (named), or after it finished (the folder holds its run).
    assert (IN_USE in line and f"PID {winner.pid}" in line) or "already holds a run" in line, line
    _assert_one_run(out, lr=0.05 if winner is first else 0.01, epochs=2)
    assert _run(_cmd("eval", str(out))).returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_holder_that_dies_frees_the_folder(sig, tmp_path, digits_root):
    out = tmp_path / "run"
    holder = _start(_train(digits_root, out, "train.epochs=200"))
    _holding(holder, out / "seed1" / ".fastprompt.lock")  # training the seed
    time.sleep(1.0)
    os.kill(holder.pid, sig)
    holder.communicate(timeout=120)
    assert holder.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + signal.SIGTERM)
    lock = (out / ".fastprompt.lock").read_text().strip()
    if sig == signal.SIGTERM:
        assert lock == ""  # released on the way out
    else:
        assert json.loads(lock)["pid"] == holder.pid  # the kernel dropped the lock; the record stays, stale
        again = _run(_train(digits_root, out, "--overwrite"))
        assert again.returncode == 0, again.stderr[-3000:]
        # The stale-lock rule: the folder is taken over, and that is said.
        assert f"took over the lock of {out}: PID {holder.pid} on host {socket.gethostname()}" in again.stdout
        _assert_one_run(out, lr=0.05, epochs=2)


def test_resumed_seeds_run_side_by_side_but_never_one_seed_twice(tmp_path, digits_root):
    # A scheduler's per-seed jobs (sweep --emit-commands) continue one folder at the same time.
    out = tmp_path / "run"
    one = _start(_train(digits_root, out, "data.seeds=[1]", "--resume"))
    _holding(one, out / "seed1" / ".fastprompt.lock")
    os.kill(one.pid, signal.SIGSTOP)
    try:
        two = _run(_train(digits_root, out, "data.seeds=[2]", "--resume"))
        same = _run(_train(digits_root, out, "data.seeds=[1]", "--resume"))
        fresh = _run(_train(digits_root, out, "data.seeds=[3]", "--overwrite"))
    finally:
        os.kill(one.pid, signal.SIGCONT)
    one.communicate(timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert f"run folder {out / 'seed1'}" in _one_error_line(same) and f"PID {one.pid}" in same.stderr
    line = _one_error_line(fresh)  # --overwrite needs the whole folder: named by the seed it waits for
    assert f"run folder {out}" in line and f"PID {one.pid}" in line and str(out / "seed1") in line
    for seed in (1, 2):
        assert json.loads((out / f"seed{seed}" / "result.json").read_text())["seed"] == seed
