"""DDP through torchrun (2 gloo processes on CPU) against one process with the same global batch,
and the sharding helpers of fastprompt.distributed."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastprompt import distributed
from fastprompt.config import load_config

REPO = Path(__file__).resolve().parents[2]


def _weights(run_dir: Path) -> dict:
    ckpts = run_dir / "seed1" / "checkpoints"
    return load_file(ckpts / (ckpts / "latest").read_text() / "model.safetensors")


def _torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # --standalone: a free local port per run, so parallel test workers never share a rendezvous.
    cmd = [torchrun, "--standalone", "--nproc_per_node", str(nproc), "-m", "fastprompt", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_torchrun_two_processes_equal_one_process(tmp_path, digits_root, fast):
    from fastprompt.protocols import run_protocol

    # 4 shots x 5 base classes = 20 images, batch 4: 5 steps per epoch, 3 epochs (warm-up + 2 at lr 0.05).
    overrides = [*fast, f"data.root={digits_root}", "data.shots=4", "train.batch_size=4", "train.log_every=1"]
    single = tmp_path / "single"
    run_protocol(load_config(None, [*overrides, f"output_dir={single}"]), say=lambda m: None)

    ddp = tmp_path / "ddp"
    proc = _torchrun(2, "train", str(REPO / "configs" / "smoke.yaml"), *overrides, f"output_dir={ddp}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "| dept+coop | imagefolder |" in proc.stdout  # rank 0 prints the table once
    assert proc.stdout.count("| dept+coop | imagefolder |") == 1

    want, got = _weights(single), _weights(ddp)
    assert set(want) == set(got) and want
    for key in want:  # same updates to float rounding (two half-batch gradients averaged)
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)
    a = json.loads((single / "results.json").read_text())
    b = json.loads((ddp / "results.json").read_text())
    assert b["runs"][0]["train"]["steps"] == a["runs"][0]["train"]["steps"] == 15
    # The epoch losses are the global-batch means, as in one process.
    assert b["runs"][0]["train"]["epoch_losses"] == pytest.approx(a["runs"][0]["train"]["epoch_losses"], abs=1e-5)
    # Sharded evaluation, counts summed over ranks: the same accuracies, give or take one image whose
    # two top logits tie to float rounding (the single process may batch the test set differently).
    one_image = 100.0 / (len(list((digits_root / "test").rglob("*.png"))) // 3)
    assert b["mean"] == pytest.approx(a["mean"], abs=one_image)
    log = (ddp / "seed1" / "train.log").read_text()
    assert "batch 4 (2 per process x 2)" in log and log.count("epoch 3/3") == 1  # rank 0 alone logs
    state = json.loads((ddp / "seed1" / "checkpoints" / "step-00000015" / "state.json").read_text())
    assert state["world_size"] == 2


def test_torchrun_promptsrc_frozen_branch_and_aggregation_equal_one_process(tmp_path, digits_root, fast):
    """DePT + PromptSRC under DDP: each process encodes the frozen image features of its half of the
    views in no-grad batches, steps through the DDP wrapper with them, and every rank aggregates the
    epochs (GPA); the saved aggregate equals one process's."""
    from fastprompt.protocols import run_protocol

    from fastprompt.config import compose_config

    overrides = [*fast, f"data.root={digits_root}", "data.shots=4", "train.batch_size=4", "method.options.depth=2", "method.options.vis_depth=2", "method.options.gpa_mean=2",
                 "method.options.gpa_std=1", "train.feature_batch_size=8"]
    single = tmp_path / "single"
    run_protocol(compose_config("base2new", "dept+promptsrc", overrides=[*overrides, f"output_dir={single}"]),
                 say=lambda m: None)
    ddp = tmp_path / "ddp"
    proc = _torchrun(2, "train", "--method", "dept+promptsrc", *overrides, f"output_dir={ddp}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    want, got = _weights(single), _weights(ddp)
    assert set(want) == set(got) and {"classifier.weight", "base.vision_prompts.tokens.1"} <= set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)
    a = json.loads((single / "results.json").read_text())["runs"][0]["train"]["epoch_losses"]
    b = json.loads((ddp / "results.json").read_text())["runs"][0]["train"]["epoch_losses"]
    assert b == pytest.approx(a, abs=1e-5)
    assert "the weights are now the average over 3 epochs" in (ddp / "seed1" / "train.log").read_text()


def test_torchrun_refuses_a_batch_that_does_not_split(tmp_path, digits_root, fast):
    proc = _torchrun(2, "train", str(REPO / "configs" / "smoke.yaml"), *fast, f"data.root={digits_root}",
                     "data.shots=4", "train.batch_size=5", f"output_dir={tmp_path / 'odd'}")
    assert proc.returncode != 0
    ours = proc.stderr.split("torch/distributed/elastic")[0]  # before torchrun's own failure report
    assert ("fastprompt train: error (rank 0): train.batch_size: the global batch of 5 images does not split "
            "evenly over 2 processes; use a multiple of 2 (e.g. train.batch_size=4)") in ours
    assert "Traceback" not in ours
    assert not (tmp_path / "odd" / "seed1" / "checkpoints").exists()


def test_local_slice_and_shard(monkeypatch):
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    parts = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(distributed.local_slice(12))
        assert distributed.shard(list(range(10))) == list(range(r, 10, 3))
    assert [(s.start, s.stop) for s in parts] == [(0, 4), (4, 8), (8, 12)]
    with pytest.raises(ValueError, match=r"use a multiple of 3 \(e.g. train.batch_size=9\)"):
        distributed.local_slice(10)


def test_single_process_helpers_are_identities():
    assert not distributed.is_distributed()
    assert distributed.local_slice(7) == slice(0, 7)
    assert distributed.shard([1, 2]) == [1, 2] and distributed.is_main() and distributed.any_rank(True)
    t = torch.ones(2)
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.0, 1.0]
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_ddp(model, torch.device("cpu")) is model
    assert not distributed.init_from_env("cpu")  # no WORLD_SIZE: nothing to join


def test_every_method_gives_every_trainable_a_gradient():
    # wrap_ddp runs DDP without find_unused_parameters (no per-step graph walk); that is only right
    # if every trainable parameter takes part in every training step, for every method.
    from fastprompt.clip import load_clip
    from fastprompt.methods import METHOD_NAMES, build_model, method_defaults

    clip = load_clip("fastprompt-tiny", None, dtype="fp32", device="cpu")
    checked = 0
    for name in METHOD_NAMES:
        # The published defaults, with only the depths set (the tiny model has 3 layers): options a
        # method's chosen variant does not use are refused when passed explicitly.
        options = {k: 2 for k in ("depth", "vis_depth") if k in method_defaults(name)}
        model = build_model(name, clip, ["cat", "dog", "fox"], **options).train()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            continue  # zero-shot CLIP: nothing to wrap
        images = torch.randn(2, 3, clip.image_size, clip.image_size)
        model(images, torch.tensor([0, 2])).loss.backward()
        assert [n for n, p in trainable if p.grad is None] == [], name
        checked += 1
    assert checked == len(METHOD_NAMES) - 1  # all but zsclip (dept+zsclip trains its CAT head)


def test_sigterm_to_torchrun_saves_once_and_resumes_to_the_single_process_result(tmp_path, digits_root, fast):
    """A preempted multi-process job: torchrun forwards SIGTERM, every rank stops at the same step,
    rank 0 checkpoints that point, and the resumed job ends where one process does."""
    import signal
    import time

    from fastprompt.protocols import run_protocol

    # 20 images at batch 2: 10 steps per epoch, 4 epochs; one metrics line per step.
    overrides = [*fast, f"data.root={digits_root}", "data.shots=4", "train.batch_size=2", "train.epochs=4",
                 "train.log_every=1", "optim.lr=0.01"]
    single = tmp_path / "single"
    run_protocol(load_config(None, [*overrides, f"output_dir={single}"]), say=lambda m: None)

    ddp = tmp_path / "ddp"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "fastprompt", "train",
           str(REPO / "configs" / "smoke.yaml"), *overrides, f"output_dir={ddp}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = ddp / "seed1" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and sum(1 for _ in open(metrics)) >= 14:  # inside epoch 2
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.count("SIGTERM received: saved checkpoint") == 1, err[-3000:]  # rank 0 reports once
    state = json.loads((ddp / "seed1" / "checkpoints" / (ddp / "seed1" / "checkpoints" / "latest").read_text()
                        / "state.json").read_text())
    assert 10 < state["step"] < 40 and state["world_size"] == 2
    assert not (ddp / "results.json").exists()

    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _weights(single), _weights(ddp)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)
    a = json.loads((single / "results.json").read_text())
    b = json.loads((ddp / "results.json").read_text())
    assert b["runs"][0]["train"]["epoch_losses"] == pytest.approx(a["runs"][0]["train"]["epoch_losses"], abs=1e-5)
