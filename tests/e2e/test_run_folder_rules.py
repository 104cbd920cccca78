"""What each command may do to a run folder (docs/run-folders.md), on real runs of the tiny model:
eval keeps the training record, --overwrite clears the earlier run first (after checking the data),
eval refuses checkpoints that are not the run's, data warnings travel with the results, the data
root is checked before the backbone is built."""
import json
import shutil
from pathlib import Path

import pytest
import yaml

from fastprompt.cli import main
from tiny_runs import CONFIG, cli_error as _error, tiny_settings, train_argv


TINY = tiny_settings(epochs=2)


def _train(digits_root, out, *extra) -> list[str]:
    return train_argv(digits_root, out, *extra, settings=TINY)


def _keys(d, prefix=""):
    """Every key path of a nested JSON value (lists of dicts by position)."""
    out = set()
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for k, v in items:
        out.add(f"{prefix}{k}")
        out |= _keys(v, f"{prefix}{k}.")
    return out


@pytest.fixture(scope="module")
def trained(digits_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(_train(digits_root, out, "data.seeds=[1,2]")) == 0
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def test_eval_keeps_every_field_training_wrote(run, digits_root, tmp_path, capsys):
    before = json.loads((run / "results.json").read_text())
    seed_before = json.loads((run / "seed1" / "result.json").read_text())
    report_row = [line for line in (run / "report.md").read_text().splitlines() if line.startswith("| dept+coop")]
    data = tmp_path / "moved"
    shutil.copytree(digits_root, data)
    assert main(["eval", str(run), f"data.root={data}", "train.eval_batch_size=7"]) == 0
    after = json.loads((run / "results.json").read_text())
    seed_after = json.loads((run / "seed1" / "result.json").read_text())
    assert _keys(before) <= _keys(after) and _keys(seed_before) <= _keys(seed_after)
    for r0, r1 in zip(before["runs"], after["runs"]):
        assert r1["train"] == r0["train"] and r1["train"]["images_per_s"] > 0  # training's record, as written
        assert r1["eval"]["loaded_checkpoint_step"] == r0["train"]["steps"]
        assert r1["base"] == pytest.approx(r0["base"]) and r1["new"] == pytest.approx(r0["new"])  # same model, data
    assert seed_after["train"] == seed_before["train"]
    for key in ("wall_seconds", "device", "config"):  # how it was trained stays
        assert after[key] == before[key]
    changed = after["eval"]["changed"]  # (output_dir too: this copy of the run lives elsewhere)
    assert f"data.root: {str(digits_root)!r} -> {str(data)!r}" in changed
    assert "train.eval_batch_size: 128 -> 7" in changed and "optim" not in changed
    assert after["eval"]["wall_seconds"] > 0
    # report.md keeps the training throughput (it showed 0 images/s when eval dropped the record)
    assert [line for line in (run / "report.md").read_text().splitlines()
            if line.startswith("| dept+coop")] == report_row
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["root"] == str(digits_root)


def test_eval_refuses_checkpoints_that_are_not_the_runs(run, digits_root, tmp_path, capsys):
    config = (run / "config.yaml").read_text()
    # config.yaml edited by hand
    (run / "config.yaml").write_text(config.replace("lr: 0.05", "lr: 0.5"))
    err = _error(capsys, ["eval", str(run)])
    assert f"the checkpoint {run / 'seed1' / 'checkpoints'}" in err and "config.yaml disagree" in err
    assert "optim.lr: 0.05 -> 0.5" in err and "Drop those overrides" not in err
    (run / "config.yaml").write_text(config)
    # checkpoints of a CoOp run copied into this DePT run
    coop = tmp_path / "coop"
    assert main(_train(digits_root, coop, "method.name=coop")) == 0
    capsys.readouterr()
    shutil.rmtree(run / "seed1" / "checkpoints")
    shutil.copytree(coop / "seed1" / "checkpoints", run / "seed1" / "checkpoints")
    err = _error(capsys, ["eval", str(run)])
    assert "config.yaml disagree (checkpoint -> config.yaml: method.name: 'coop' -> 'dept+coop'" in err
    assert "or the checkpoint comes from another run" in err and "Drop those overrides" not in err
    # a real override is still named as one
    err = _error(capsys, ["eval", str(coop), "optim.lr=0.9"])
    assert "Drop those overrides" in err and "optim.lr: 0.05 -> 0.9" in err
    err = _error(capsys, ["eval", str(coop), f"output_dir={run}"])
    assert "drop the output_dir=... override" in err


def test_eval_refuses_a_checkpoint_of_a_training_that_stopped_early(run, capsys):
    state = run / "seed1" / "checkpoints"
    # Rewrite the run's config so its one epoch-2 checkpoint reads as epoch 2 of 4, as a run killed
    # after its second epoch leaves it (config.yaml and the checkpoint agree on everything else).
    from fastprompt.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(state)
    meta = dict(ckpt.meta)
    meta["config"]["train"]["epochs"] = 4
    for key in ("sha256", "state_sha256", "step"):
        meta.pop(key)
    save_checkpoint(state, step=ckpt.meta["step"], model_state=ckpt.model_state, trainer_tensors=ckpt.trainer_tensors,
                    meta=meta)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("epochs: 2", "epochs: 4"))
    err = _error(capsys, ["eval", str(run)])
    assert "is from a training that stopped after 2 of 4 epochs" in err and "--resume" in err


def test_overwrite_clears_the_earlier_run_but_keeps_the_caches(run, digits_root, capsys):
    (run / "seed1" / "notes.txt").write_text("mine")  # not the run's: stays
    splits = sorted(p.name for p in (run / "splits").iterdir())
    assert main(_train(digits_root, run, "--overwrite", "optim.lr=0.01")) == 0  # seeds [1] only now
    assert not (run / "seed2").exists()  # the earlier run's seed 2 is not left next to the new config
    assert (run / "seed1" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (run / "splits").iterdir()) == splits and (run / "features").is_dir()
    log = (run / "seed1" / "train.log").read_text()
    assert log.count(" training ") == 1  # a fresh log, not the earlier run's with this one appended
    results = json.loads((run / "results.json").read_text())
    assert results["seeds"] == [1] and results["config"]["optim"]["lr"] == 0.01


def test_overwrite_with_a_wrong_data_root_keeps_the_earlier_run(run, capsys):
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    err = _error(capsys, _train("/no/such/data", run, "--overwrite"))
    assert "data root '/no/such/data' for imagefolder does not exist" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_and_overwrite_exclude_each_other(tmp_path, digits_root, capsys):
    import fastprompt

    with pytest.raises(SystemExit) as exit_:
        main(_train(digits_root, tmp_path / "r", "--resume", "--overwrite"))
    assert exit_.value.code == 2
    assert "argument --overwrite: not allowed with argument --resume" in capsys.readouterr().err
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        fastprompt.train(CONFIG, resume=True, overwrite=True)
    assert not (tmp_path / "r").exists()


def test_resume_of_an_empty_folder_says_it_starts(tmp_path, digits_root, capsys):
    assert main(_train(digits_root, tmp_path / "r", "--resume")) == 0
    assert f"--resume: {tmp_path / 'r'} holds no earlier run to continue; starting it" in capsys.readouterr().out


def test_data_warnings_reach_the_log_results_and_report(tmp_path, digits_root, capsys):
    # Classes (sorted) one, three, zero: base = one, three; new = zero alone; three has no test images.
    data = tmp_path / "data"
    for split in ("train", "test"):
        for name in ("zero", "one"):
            shutil.copytree(digits_root / split / name, data / split / name)
    shutil.copytree(digits_root / "train" / "three", data / "train" / "three")
    shutil.copytree(digits_root / "train" / "four", data / "train" / ".four")  # hidden: skipped
    out = tmp_path / "r"
    assert main(["train", CONFIG, *TINY, f"data.root={data}", f"output_dir={out}", "train.epochs=1"]) == 0
    results = json.loads((out / "results.json").read_text())
    expected = [f"{data.name}: 1 class(es) have no test images ('three'): its accuracy is not measured",
                f"{data.name}: the new half holds a single class ('zero'), so new-class accuracy is 100%",
                f"skipped the folder '{data / 'train' / '.four'}'",
                "optim.warmup_epochs=1 >= train.epochs=1: every epoch trains at the warm-up lr"]
    log, report = (out / "seed1" / "train.log").read_text(), (out / "report.md").read_text()
    for warning in expected:
        assert any(warning in w for w in results["warnings"]), (warning, results["warnings"])
        assert f"WARNING {warning}" in log or any(warning in line and "WARNING" in line for line in log.splitlines())
        assert warning in report
    assert "#### Warnings" in report and report.index("#### Warnings") > report.index("| dept+coop")


def test_a_wrong_data_root_is_said_before_the_backbone_is_built(tmp_path, monkeypatch, capsys):
    import fastprompt.protocols.session as session

    def no_download(*args, **kwargs):
        raise AssertionError("the backbone was built before the data root was checked")

    monkeypatch.setattr(session, "load_clip", no_download)
    err = _error(capsys, ["train", "--method", "coop", "data.root=/no/such/data", "data.dataset=dtd",
                          f"output_dir={tmp_path / 'r'}"])  # the default weights: a download
    assert "data root '/no/such/data' for dtd does not exist" in err
    (tmp_path / "data").mkdir()
    err = _error(capsys, ["train", "--method", "coop", f"data.root={tmp_path / 'data'}", "data.dataset=dtd",
                          f"output_dir={tmp_path / 'r'}"])
    assert f"dtd folder '{tmp_path / 'data' / 'dtd'}' does not exist" in err


def test_one_class_is_not_enough_for_base_to_new(tmp_path, digits_root, capsys):
    data = tmp_path / "data"
    shutil.copytree(digits_root / "train" / "zero", data / "zero")
    err = _error(capsys, ["train", CONFIG, *TINY, f"data.root={data}", f"output_dir={tmp_path / 'r'}"])
    assert "base-to-new needs at least 2 classes" in err and "--protocol train_eval" in err


def test_demo_replaces_only_a_demo_run(trained, tmp_path, capsys):
    other = tmp_path / "mine"
    shutil.copytree(trained, other)
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    err = _error(capsys, ["demo", "--fast", "--output-dir", str(other)])
    assert f"{other} holds a run that is not a demo's" in err and "--output-dir" in err
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before


def test_the_world_demo_replaces_its_own_method_folders_and_refuses_any_other_run(tmp_path, monkeypatch):
    import fastprompt.demo as demo
    from fastprompt.errors import RunFolderError
    from fastprompt.run_folder import RunFolder

    out = tmp_path / "demo"
    earlier = demo.demo_config(out, method="coop")  # an earlier demo's CoOp folder, with a result
    RunFolder(earlier.output_dir).create()
    RunFolder(earlier.output_dir).record_config(earlier)
    (Path(earlier.output_dir) / "results.json").write_text("{}")
    (out / "report.md").write_text("old table")
    ran = []
    monkeypatch.setattr(demo, "_demo", lambda configs, *args: ran.append([c.method.name for c in configs]) or [])
    demo.run_demo(out, methods=("zsclip", "coop"), say=lambda m: None)
    assert ran == [["zsclip", "coop"]]
    assert not (Path(earlier.output_dir) / "results.json").exists() and not (out / "report.md").exists()

    # A run folder the demo did not write, anywhere below its folder, stops it before anything is removed.
    mine = demo.demo_config(out, ["data.root=/elsewhere"], method="kgcoop")
    RunFolder(mine.output_dir).create()
    RunFolder(mine.output_dir).record_config(mine)
    (Path(mine.output_dir) / "results.json").write_text("{}")
    with pytest.raises(RunFolderError, match="holds a run that is not a demo's"):
        demo.run_demo(out, methods=("zsclip", "kgcoop"), say=lambda m: None)
    assert (Path(mine.output_dir) / "results.json").exists() and ran == [["zsclip", "coop"]]
