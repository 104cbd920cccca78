"""Faults on real runs: SIGKILL in the middle of a checkpoint write, SIGTERM/SIGINT, damaged
checkpoints, inf/NaN losses (fp32 stops, fp16's GradScaler skips). Each interrupted run resumes to
the uninterrupted run's parameters; nothing already written is corrupted or lost."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fastprompt.checkpoint import latest_checkpoint_dir, load_checkpoint
from fastprompt.cli import main
from fastprompt.config import load_config
from fastprompt.errors import CheckpointError, DatasetError, DivergenceError
from fastprompt.protocols import run_protocol
from fastprompt.training import fit

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "smoke.yaml")
# 4 shots x 5 base classes = 20 images at batch 2: 10 steps per epoch, 4 epochs, a checkpoint each epoch.
RUN = ["model.name=fastprompt-tiny", "model.pretrained=null", "data.dataset=imagefolder", "data.seeds=[1]",
       "data.shots=4", "data.crop_scale=[0.9,1.0]", "train.epochs=4", "train.batch_size=2", "train.precision=fp32",
       "train.device=cpu", "train.num_workers=0", "train.progress=false", "train.log_every=1", "optim.lr=0.01"]


def _args(digits_root, out) -> list[str]:
    return [*RUN, f"data.root={digits_root}", f"output_dir={out}"]


def _weights(run_dir: Path) -> dict:
    return load_file(latest_checkpoint_dir(run_dir / "seed1" / "checkpoints") / "model.safetensors")


def _assert_same_run(got_dir: Path, want_dir: Path) -> None:
    want, got = _weights(want_dir), _weights(got_dir)
    assert set(want) == set(got) and want
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    a = json.loads((want_dir / "results.json").read_text())
    b = json.loads((got_dir / "results.json").read_text())
    assert b["mean"] == pytest.approx(a["mean"], abs=1e-9)
    assert b["runs"][0]["train"]["epoch_losses"] == pytest.approx(a["runs"][0]["train"]["epoch_losses"], abs=1e-6)
    leftovers = [p.name for p in (got_dir / "seed1" / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # half-written folders of the killed run were cleaned up


@pytest.fixture(scope="module")
def straight(digits_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    torch.set_num_threads(1)
    run_protocol(load_config(CONFIG, _args(digits_root, out)), say=lambda m: None)
    return out


def _popen(args: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fastprompt", "train", CONFIG, *args], cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1", **env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _resume(digits_root, out) -> None:
    run_protocol(load_config(CONFIG, _args(digits_root, out)), resume=True, say=lambda m: None)


@pytest.mark.parametrize("point", ["tensors", "rename", "latest"])
def test_sigkill_in_the_middle_of_a_checkpoint_write(point, straight, digits_root, tmp_path):
    out = tmp_path / "run"
    proc = _popen(_args(digits_root, out), FASTPROMPT_FAULT=f"{point}:2")  # during the 2nd save (epoch 2)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    ckpts = out / "seed1" / "checkpoints"
    # The previous checkpoint is intact (checksums verified) and still the one `latest` names.
    ckpt = load_checkpoint(ckpts)
    assert ckpt.path.name == "step-00000010" and ckpt.meta["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt.model_state.values())
    names = sorted(p.name for p in ckpts.iterdir())
    if point == "latest":
        assert "step-00000020" in names  # complete, renamed, but never made `latest`
    else:
        assert any(n.startswith(".step-00000020.tmp-") for n in names), names
    assert not (out / "results.json").exists()

    _resume(digits_root, out)
    assert "resumed from" in (out / "seed1" / "train.log").read_text()
    _assert_same_run(out, straight)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_a_checkpoint_then_resume_exactly(sig, straight, digits_root, tmp_path):
    out = tmp_path / "run"
    proc = _popen(_args(digits_root, out))
    metrics = out / "seed1" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    # Wait until the run is inside epoch 2 (log_every=1: one line per step).
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and sum(1 for _ in open(metrics)) >= 14:
            break
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert f"{signal.Signals(sig).name} received: saved checkpoint" in err and "--resume" in err
    assert "Traceback" not in err
    ckpt = load_checkpoint(out / "seed1" / "checkpoints")
    steps_done = max(json.loads(line)["step"] for line in open(metrics) if '"train"' in line)
    assert ckpt.meta["step"] == steps_done  # saved where it stopped, mid-epoch, not at the last epoch end
    assert 10 < steps_done < 40 and ckpt.meta["batch_in_epoch"] == steps_done % 10
    assert not (out / "results.json").exists()

    _resume(digits_root, out)
    _assert_same_run(out, straight)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "edit state.json", "latest names nothing"])
def test_damaged_checkpoint_is_refused_with_a_clear_message(damage, straight, digits_root, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    ckpt = latest_checkpoint_dir(out / "seed1" / "checkpoints")
    if damage == "flip a byte":
        target = ckpt / "model.safetensors"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
        expect = f"checkpoint file {target} does not match the checksum"
    elif damage == "truncate":
        target = ckpt / "trainer.safetensors"
        target.write_bytes(target.read_bytes()[:100])
        expect = f"checkpoint file {target} does not match the checksum"
    elif damage == "edit state.json":
        target = ckpt / "state.json"
        state = json.loads(target.read_text())
        state["epoch"] = 1  # e.g. a hand edit to train again from epoch 1
        target.write_text(json.dumps(state))
        expect = f"{target} was modified after it was written"
    else:
        target = ckpt.parent / "latest"
        target.write_text("step-99999999")
        expect = "names 'step-99999999', but"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for argv in (["train", CONFIG, *_args(digits_root, out), "--resume"], ["eval", str(out), "train.progress=false"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert expect in err and "restore the folder from a backup, or delete" in err and "Traceback" not in err
    # Nothing the run had written was touched by the refused commands.
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_nan_loss_stops_with_the_last_good_checkpoint_and_advice(digits_root, tmp_path):
    out = tmp_path / "run"
    # Warm-up epoch at 1e-5 is fine; epoch 2 at lr 1e30 diverges. A config refuses such an lr
    # (optim.lr <= 10), so it is set past the check, as a run that diverges on its own would be.
    cfg = load_config(CONFIG, _args(digits_root, out))
    cfg.optim.lr = 1e30
    with pytest.raises(DivergenceError) as caught:
        run_protocol(cfg, say=lambda m: None)
    err = str(caught.value)
    assert "training diverged in epoch 1" in err and "became inf/NaN" in err
    for advice in ("lower optim.lr", "optim.grad_clip=1.0", "train.precision=bf16", "last good checkpoint is kept"):
        assert advice in err
    ckpt = load_checkpoint(out / "seed1" / "checkpoints")
    assert ckpt.meta["epoch"] == 1 and ckpt.meta["step"] == 10
    assert all(torch.isfinite(t).all() for t in ckpt.model_state.values())
    assert not (out / "results.json").exists() and not (out / "seed1" / "result.json").exists()


class _TinyModel(nn.Module):
    """Frozen linear 'encoder', trainable prompt and head: fast enough to train fp16 on the CPU."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(48, 8).requires_grad_(False)
        self.prompt = nn.Parameter(torch.zeros(8))
        self.head = nn.Linear(8, 3)

    def forward(self, images, labels=None):
        logits = self.head(self.encoder(images.flatten(1)) + self.prompt).float()
        return SimpleNamespace(logits=logits, loss=nn.functional.cross_entropy(logits, labels))


class _PoisonedSource:
    """24 learnable images; image 5 holds `value` (1e6 overflows fp16, max 65504, into an inf loss)."""

    def __init__(self, value: float):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(24) % 3
        self.images = torch.randn(24, 3, 4, 4, generator=g) * 0.5 + self.labels.view(-1, 1, 1, 1).float()
        self.images[5] = value

    def batch(self, indices):
        return self.images[indices], self.labels[indices]


def _identity(images, generator=None):
    return images


def test_fp16_grad_scaler_skips_inf_steps_and_fp32_stops(tmp_path):
    base = ["train.epochs=3", "train.batch_size=4", "train.device=cpu", "train.progress=false", "optim.lr=0.05",
            "optim.warmup_epochs=0"]
    torch.manual_seed(0)
    model = _TinyModel()
    result = fit(model, _PoisonedSource(1e6), _identity, load_config(None, [*base, "train.precision=fp16",
                                                                          f"output_dir={tmp_path / 'fp16'}"]),
                 tmp_path / "fp16", seed=1)
    assert result.steps == 18 and all(math.isfinite(x) for x in result.epoch_losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    epochs = [json.loads(line) for line in open(tmp_path / "fp16" / "metrics.jsonl") if '"epoch"' in line]
    assert [e.get("skipped_steps") for e in epochs] == [1, 1, 1]  # the poisoned batch, once per epoch
    assert "were skipped by the GradScaler" in (tmp_path / "fp16" / "train.log").read_text()

    # Without a GradScaler (fp32, bf16) an inf/NaN loss stops the run instead.
    with pytest.raises(DivergenceError, match="training diverged in epoch 0"):
        fit(_TinyModel(), _PoisonedSource(1e30), _identity,
            load_config(None, [*base, "train.precision=fp32", f"output_dir={tmp_path / 'fp32'}"]),
            tmp_path / "fp32", seed=1)
    with pytest.raises(CheckpointError):  # nothing was saved from the diverged epoch
        load_checkpoint(tmp_path / "fp32" / "checkpoints")


@pytest.mark.parametrize("precision, value", [("fp32", float("nan")), ("fp32", float("inf")), ("fp16", float("nan"))])
def test_nan_or_inf_in_the_input_images_is_blamed_on_the_input(precision, value, tmp_path):
    # Not on the learning rate or mixed precision: the error names the images, found by looking at
    # them only once the run diverged (fp16: once a whole epoch of steps was skipped).
    source = _PoisonedSource(1.0)
    source.images[:] = value if precision == "fp16" else source.images
    source.images[5] = value
    cfg = load_config(None, ["train.epochs=2", "train.batch_size=4", "train.device=cpu", "train.progress=false",
                             "optim.warmup_epochs=0", f"train.precision={precision}", f"output_dir={tmp_path}"])
    with pytest.raises(DatasetError) as caught:
        fit(_TinyModel(), source, _identity, cfg, tmp_path, seed=1)
    message = str(caught.value)
    count = "24 of 24" if precision == "fp16" else "1 of 24"
    assert f"{count} training images hold NaN or inf values (the first: image {0 if precision == 'fp16' else 5})" \
        in message and "not mixed precision" in message
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").glob("step-*"))


def test_a_nan_image_reaching_the_cat_head_is_blamed_on_the_input(tmp_path):
    # DePT's head checks its features; without the input check its error read "mixed-precision overflow?".
    from fastprompt.clip import load_clip
    from fastprompt.methods import build_model

    clip = load_clip("fastprompt-tiny", None, device="cpu")
    model = build_model("dept+coop", clip, ["apple", "pear", "plum"], n_ctx=2)
    source = _PoisonedSource(1.0)
    source.images = torch.rand(24, 3, clip.image_size, clip.image_size)
    source.images[7, 0, 3, 3] = float("nan")
    cfg = load_config(None, ["train.epochs=1", "train.batch_size=4", "train.device=cpu", "train.progress=false",
                             "train.precision=fp32", "train.precompute_features=false", f"output_dir={tmp_path}"])
    with pytest.raises(DatasetError, match="1 of 24 training images hold NaN or inf values .the first: image 7."):
        fit(model, source, _identity, cfg, tmp_path, seed=1)
