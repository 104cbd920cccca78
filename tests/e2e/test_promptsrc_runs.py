"""IVLP, PromptSRC and their DePT variants through `fastprompt train` with the shipped layers (tiny
random CLIP, digits): every method and protocol runs, `fastprompt report` shows them beside the
other methods, what is saved and evaluated is the Gaussian prompt aggregate, and a run killed
mid-way and resumed ends with bit-identical weights."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastprompt.checkpoint import latest_checkpoint_dir
from fastprompt.cli import main
from fastprompt.config import load_config

REPO = Path(__file__).resolve().parents[2]
TINY_DEPTH = ["method.options.depth=2", "method.options.vis_depth=2"]  # base-to-new's 9 layers: the tiny model has 3


def _final_weights(run_dir: Path) -> dict:
    return load_file(latest_checkpoint_dir(run_dir / "seed1" / "checkpoints") / "model.safetensors")


def test_train_runs_each_method_and_report_shows_them_beside_the_others(tmp_path, digits_root, fast, capsys):
    folders = {}
    for method in ("ivlp", "promptsrc", "dept+ivlp", "dept+promptsrc", "maple"):
        out = folders[method] = tmp_path / method.replace("+", "_")
        depth = TINY_DEPTH if "maple" not in method else ["method.options.depth=2"]
        assert main(["train", "--protocol", "base2new", "--method", method, *fast, "train.epochs=2", *depth,
                     f"data.root={digits_root}", f"output_dir={out}"]) == 0, method
        cfg = load_config(out / "config.yaml")  # the composed PromptSRC settings, the overrides on top
        if method != "maple":
            assert (cfg.method.options["depth"], cfg.method.options["vis_depth"]) == (2, 2)
        aggregated = method.endswith("promptsrc")
        assert ("gpa_mean" in cfg.method.options) is aggregated
        log = (out / "seed1" / "train.log").read_text()
        assert ("Gaussian prompt aggregation: the weights are now the average over 2 epochs" in log) is aggregated
        results = json.loads((out / "results.json").read_text())
        assert results["method"] == method and 0 <= results["mean"]["hm"] <= 100
    capsys.readouterr()
    assert main(["report", *map(str, folders.values()), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "report.md").read_text()
    for method in folders:
        assert f"| {method} | imagefolder |" in table, method


def test_few_shot_and_cross_dataset_compose_promptsrcs_settings_and_run(tmp_path, digits_root, fast):
    common = [*fast, f"data.root={digits_root}", "train.epochs=1"]
    # Cross-dataset: depth 3 / 3 and GPA (6, 10) from the layers; the tiny model has exactly 3 layers.
    out = tmp_path / "cross"
    assert main(["train", "--protocol", "cross_dataset", "--method", "dept+promptsrc", *common,
                 "protocol.targets=[imagefolder]", f"output_dir={out}"]) == 0
    cfg = load_config(out / "config.yaml")
    assert cfg.method.options == {"depth": 3, "vis_depth": 3, "gpa_mean": 6.0, "gpa_std": 10.0}
    assert json.loads((out / "results.json").read_text())["protocol"] == "cross_dataset"
    # Few-shot: 50 epochs and GPA (30, 30) composed, overridden here to 1 epoch at 2 shots.
    out = tmp_path / "few"
    assert main(["train", "--protocol", "few_shot", "--method", "promptsrc", *common, *TINY_DEPTH,
                 "protocol.shots=[2]", f"output_dir={out}"]) == 0
    cfg = load_config(out / "config.yaml")
    assert (cfg.method.options["gpa_mean"], cfg.method.options["gpa_std"]) == (30.0, 30.0)
    assert set(json.loads((out / "results.json").read_text())["results"]) == {"2"}


def test_the_saved_and_evaluated_model_is_the_aggregate(tmp_path, digits_root, fast):
    """GPA (mean 1, std 0.05) over 3 epochs puts all the weight on epoch 1 (the others' weights
    underflow to 0): the checkpoint, and what the run evaluated, are epoch 1's weights, bit for bit
    those of a 1-epoch run; without GPA they are epoch 3's."""
    common = ["--method", "promptsrc", *fast, f"data.root={digits_root}", *TINY_DEPTH, "method.options.gpa_mean=1",
              "method.options.gpa_std=0.05"]
    runs = {"gpa": ["train.epochs=3"], "one_epoch": ["train.epochs=1"],
            "no_gpa": ["train.epochs=3", "method.options.gpa=false"]}
    for name, extra in runs.items():
        assert main(["train", *common, *extra, f"output_dir={tmp_path / name}"]) == 0, name
    gpa, one, raw = (_final_weights(tmp_path / name) for name in runs)
    assert set(gpa) == set(one) == set(raw)
    assert all(torch.equal(gpa[k], one[k]) for k in gpa)
    assert not all(torch.equal(gpa[k], raw[k]) for k in gpa)
    accuracy = {name: json.loads((tmp_path / name / "results.json").read_text())["mean"] for name in runs}
    assert accuracy["gpa"] == accuracy["one_epoch"]
    assert main(["eval", str(tmp_path / "gpa")]) == 0  # `fastprompt eval` loads the same aggregate
    assert json.loads((tmp_path / "gpa" / "results.json").read_text())["mean"] == accuracy["gpa"]


def test_killed_and_resumed_run_aggregates_bit_for_bit_as_an_uninterrupted_one(tmp_path, digits_root, fast):
    """SIGKILL while the 3rd epoch's checkpoint is written (FASTPROMPT_FAULT): the run resumes from
    epoch 2's checkpoint, with the aggregator's running sum, and ends with the very same weights."""
    args = ["train", "--protocol", "base2new", "--method", "dept+promptsrc", *fast, *TINY_DEPTH, "train.epochs=4",
            "method.options.gpa_mean=2.5", "method.options.gpa_std=1.0", f"data.root={digits_root}"]

    def popen(out, *extra, **env):
        return subprocess.Popen([sys.executable, "-m", "fastprompt", *args, f"output_dir={out}", *extra], cwd=REPO,
                                env=dict(os.environ, OMP_NUM_THREADS="1", **env), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    straight, killed = popen(tmp_path / "straight"), popen(tmp_path / "killed", FASTPROMPT_FAULT="rename:3")
    _, err = killed.communicate(timeout=240)
    assert killed.returncode == -signal.SIGKILL, err[-3000:]
    ckpt = json.loads((latest_checkpoint_dir(tmp_path / "killed" / "seed1" / "checkpoints") / "state.json").read_text())
    assert ckpt["epoch"] == 2 and ckpt["gpa"]["epochs_done"] == 2
    resumed = popen(tmp_path / "killed", "--resume")
    for proc in (straight, resumed):
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in (tmp_path / "killed" / "seed1" / "train.log").read_text()
    want, got = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "killed")
    assert set(want) == set(got) and {"classifier.weight", "base.vision_prompts.tokens.1"} <= set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    a = json.loads((tmp_path / "straight" / "results.json").read_text())["mean"]
    b = json.loads((tmp_path / "killed" / "results.json").read_text())["mean"]
    assert a == b
