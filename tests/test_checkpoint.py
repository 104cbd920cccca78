"""Checkpoint I/O: trainable tensors only, atomic writes, checksums, optimiser state round trip."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from fastprompt.atomic_io import atomic_write_bytes
from fastprompt.checkpoint import (
    latest_checkpoint_dir,
    load_checkpoint,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    save_checkpoint,
)
from fastprompt.errors import CheckpointError


def _save(root, step, value=1.0, **kw):
    return save_checkpoint(root, step=step, model_state={"ctx": torch.full((3, 4), value)},
                           trainer_tensors={"rng.torch": torch.get_rng_state()}, meta={"epoch": step}, **kw)


def test_round_trip_and_latest(tmp_path):
    _save(tmp_path, 10, 1.0)
    path = _save(tmp_path, 20, 2.0)
    assert latest_checkpoint_dir(tmp_path) == path
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.meta["step"] == 20 and ckpt.meta["epoch"] == 20
    torch.testing.assert_close(ckpt.model_state["ctx"], torch.full((3, 4), 2.0))
    # keep_last=1 prunes the older complete checkpoint; no temp folders are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000020"]


def test_files_are_safetensors_and_json(tmp_path):
    path = _save(tmp_path, 1)
    assert set(load_file(path / "model.safetensors")) == {"ctx"}
    state = json.loads((path / "state.json").read_text())
    assert set(state["sha256"]) == {"model.safetensors", "trainer.safetensors"}


def test_tampered_file_is_refused(tmp_path):
    path = _save(tmp_path, 5)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_checkpoint(tmp_path)


def test_truncated_file_is_refused(tmp_path):
    path = _save(tmp_path, 5)
    (path / "trainer.safetensors").write_bytes((path / "trainer.safetensors").read_bytes()[:20])
    with pytest.raises(CheckpointError, match="trainer.safetensors"):
        load_checkpoint(tmp_path)


def test_write_killed_midway_keeps_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1, 1.0)
    real_replace = os.replace

    def crash_on_rename(src, dst):  # the kill lands after the new files are written, before the rename
        if "step-00000002" in str(dst):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_rename)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, 2.0)
    monkeypatch.setattr(os, "replace", real_replace)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.meta["step"] == 1
    torch.testing.assert_close(ckpt.model_state["ctx"], torch.full((3, 4), 1.0))
    _save(tmp_path, 2, 2.0)  # the next save cleans the half-written folder up
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_atomic_write_bytes_replaces_whole_file(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_missing_checkpoint_messages(tmp_path):
    assert latest_checkpoint_dir(tmp_path) is None
    with pytest.raises(CheckpointError, match="not a fastprompt checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("step-00000099")
    with pytest.raises(CheckpointError, match="does not exist"):
        latest_checkpoint_dir(tmp_path)


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_optimizer_state_round_trip(name, tmp_path):
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    kwargs = {"lr": 0.1, "momentum": 0.9} if name == "SGD" else {"lr": 0.01}
    opt = getattr(torch.optim, name)(params, **kwargs)
    for _ in range(3):
        (params[0].sum() ** 2 + params[1].pow(3).sum()).backward()
        opt.step()
        opt.zero_grad()
    tensors, rest = optimizer_state_to_flat(opt.state_dict())
    path = save_checkpoint(tmp_path, step=3, model_state={}, trainer_tensors=tensors, meta={"optimizer": rest})
    ckpt = load_checkpoint(path)
    fresh = getattr(torch.optim, name)([torch.nn.Parameter(p.detach().clone()) for p in params], **kwargs)
    fresh.load_state_dict(optimizer_state_from_flat(ckpt.trainer_tensors, ckpt.meta["optimizer"]))
    want, got = opt.state_dict(), fresh.state_dict()
    assert want["param_groups"] == got["param_groups"]
    for idx, st in want["state"].items():
        for key, value in st.items():
            torch.testing.assert_close(got["state"][idx][key], value, rtol=0, atol=0)
    # And the next step is the same step.
    fresh_params = [p for g in fresh.param_groups for p in g["params"]]
    for ps, o in ((params, opt), (fresh_params, fresh)):
        (ps[0].sum() ** 2 + ps[1].pow(3).sum()).backward()
        o.step()
    for a, b in zip(params, fresh_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_atomic_write_that_fails_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    from fastprompt.data import few_shot

    target = tmp_path / "f.txt"
    atomic_write_bytes(target, b"old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    with pytest.raises(OSError, match="disk full"):  # the few-shot cache writes through the same helper
        few_shot._write_atomic(tmp_path / "split.json", {"train": []})
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_a_checkpoint_that_cannot_be_written_leaves_the_previous_one(tmp_path, monkeypatch):
    # A full disk in the middle of a save: WriteError naming the checkpoint, no half-written folder,
    # and `latest` still names the previous checkpoint, complete.
    import errno

    import fastprompt.checkpoint as checkpoint
    from fastprompt.errors import WriteError

    state = {"w": torch.arange(4.0)}
    save_checkpoint(tmp_path, step=1, model_state=state, trainer_tensors={}, meta={"epoch": 1})
    real = checkpoint._write_synced
    calls = []

    def full(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(checkpoint, "_write_synced", full)
    with pytest.raises(WriteError, match=f"cannot write {tmp_path / 'step-00000002'}: No space left on device"):
        save_checkpoint(tmp_path, step=2, model_state={"w": torch.ones(4)}, trainer_tensors={}, meta={"epoch": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.meta["step"] == 1 and torch.equal(ckpt.model_state["w"], state["w"])
