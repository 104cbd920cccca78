"""The `fastprompt` command in fresh processes: the demo prints its table, a killed training run
resumes to the same parameters as an uninterrupted one, eval/report work on a run folder, and
user errors come back as one clear line (exit code 2), not a traceback."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fastprompt.cli import main
from fastprompt.config import config_to_dict, load_config
from fastprompt.demo import demo_config, smoke_config

REPO = Path(__file__).resolve().parents[2]


def _final_weights(run_dir: Path) -> dict:
    ckpts = run_dir / "seed1" / "checkpoints"
    return load_file(ckpts / (ckpts / "latest").read_text() / "model.safetensors")


def test_smoke_demo_runs_and_prints_the_table(tmp_path, run_cli, capsys):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--smoke", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "| method | dataset | Base | New | HM | train images/s |" in text
    assert "| dept+coop | imagefolder |" in text
    assert "images/s" in text and "random" in text.lower() and "model.pretrained=openai" in text
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"] == "base2new" and results["method"] == "dept+coop"
    row = next(line for line in text.splitlines() if line.startswith("| dept+coop"))
    assert f"| {results['mean']['hm']:.2f} |" in row  # the printed HM is the computed one
    for name in ("config.yaml", "report.md", "chart.png", "seed1/train.log", "seed1/metrics.jsonl",
                 "data/train/zero", "data/test/nine"):
        assert (out / name).exists(), name
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The run's log says which activation the backbone was built with, and why.
    log = (out / "seed1/train.log").read_text()
    assert "backbone fastprompt-tiny: towers built with nn.GELU (random weights" in log
    # ... and what runs the attention and the CAT head under `auto` (on a CPU: no Triton), and why.
    assert "attention: auto -> sdpa (cpu device: the Triton kernels run natively on CUDA GPUs only); CAT head: " \
           "auto -> reference (cpu device" in log
    assert _final_weights(out)  # a checkpoint with the trained tensors

    # `fastprompt eval` rebuilds the models from the checkpoints and gets the same accuracies.
    before = results["runs"][0]
    assert main(["eval", str(out), "train.progress=false"]) == 0
    again = json.loads((out / "results.json").read_text())["runs"][0]
    assert (again["base"], again["new"]) == (before["base"], before["new"])
    # A setting the checkpoint was not trained with is one clear error naming it, not a size mismatch.
    capsys.readouterr()
    assert main(["eval", str(out), "train.progress=false", "method.options.n_ctx=8"]) == 2
    err = capsys.readouterr().err
    assert "cannot evaluate" in err and "method.options: {} -> {'n_ctx': 8}" in err and "Traceback" not in err
    assert json.loads((out / "results.json").read_text())["runs"][0] == again  # results untouched

    # `fastprompt report` writes the table and the chart for any list of run folders.
    report_dir = tmp_path / "report"
    assert main(["report", str(out), "--out", str(report_dir)]) == 0
    assert "| dept+coop | imagefolder |" in (report_dir / "report.md").read_text()
    assert (report_dir / "chart.png").stat().st_size > 1000


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, digits_root, fast):
    from fastprompt.protocols import run_protocol

    overrides = [*fast, f"data.root={digits_root}", "train.epochs=6", "train.batch_size=2", "optim.lr=0.01"]
    straight_dir = tmp_path / "straight"
    run_protocol(load_config(None, [*overrides, f"output_dir={straight_dir}"]), say=lambda m: None)

    killed_dir = tmp_path / "killed"
    args = [sys.executable, "-m", "fastprompt", "train", str(REPO / "configs" / "smoke.yaml"), *overrides,
            f"output_dir={killed_dir}"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = killed_dir / "seed1" / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up, as with a preempted job
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_at = int(latest.read_text().split("-")[1])
    assert 0 < killed_at < 6 * 20  # killed mid-run: 40 images / batch 2 = 20 steps per epoch
    assert not (killed_dir / "results.json").exists()

    resumed = subprocess.run(args + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in (killed_dir / "seed1" / "train.log").read_text()
    want, got = _final_weights(straight_dir), _final_weights(killed_dir)
    assert set(want) == set(got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    a = json.loads((straight_dir / "results.json").read_text())["mean"]
    b = json.loads((killed_dir / "results.json").read_text())["mean"]
    assert a == pytest.approx(b, abs=1e-9)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "configs/base2new/dept_coop.yaml", "optim.lrr=0.1"], "did you mean 'optim.lr'"),
        (["train", "configs/base2new/dept_coop.yaml", "train.epochs=ten"], "train.epochs: expected int, got 'ten'"),
        (["train", "configs/nope.yaml"], "config file not found"),
        (["train", "configs/base2new/dept_coop.yaml", "method.name=dept+copo"], "did you mean 'dept+coop'"),
        (["train", "configs/base2new/dept_coop.yaml", "model.pretrained=null", "model.name=fastprompt-tiny",
          "train.device=cpu", "data.root=/nonexistent/data"], "/nonexistent/data"),
        (["eval", "/nonexistent/run"], "not a run folder"),
        (["train", "--method", "dept+copo", "data.root=/data"], "unknown method 'dept+copo'; did you mean 'dept+coop'"),
        (["train", "configs/demo.yaml", "--method", "coop"], "a CONFIG file or --protocol/--method/--dataset, not both"),
        (["train", "data.root=/data", "data.dataset=dtd"], "name what to train: --method METHOD"),
    ],
)
def test_user_errors_are_one_clear_line(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    argv = [*argv, f"output_dir={tmp_path}"] if argv[0] == "train" and len(argv) > 2 else argv
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastprompt {argv[0]}: error: ") and message in err and "Traceback" not in err


def test_train_composes_the_shipped_layers_outside_a_checkout(tmp_path, digits_root, fast, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: --protocol/--method compose the layers in the package
    out = tmp_path / "run"
    assert main(["train", "--protocol", "train_eval", "--method", "dept+coop", *fast, "train.epochs=1",
                 f"data.root={digits_root}", f"output_dir={out}"]) == 0
    saved = load_config(out / "config.yaml")
    assert (saved.protocol.name, saved.method.name, saved.train.epochs) == ("train_eval", "dept+coop", 1)
    assert json.loads((out / "results.json").read_text())["protocol"] == "train_eval"


@pytest.mark.parametrize("command", ["train", "eval", "report", "demo", "config"])
def test_help_explains_each_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: fastprompt " + command in text
    if command in ("train", "eval", "config"):
        assert "optim.lr=0.002" in text and "protocol.name" in text and "model.pretrained" in text


def test_demo_help_and_yaml_comments_say_what_the_demo_does(capsys):
    from fastprompt.demo import FAST_OVERRIDES

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert " ".join(FAST_OVERRIDES) in help_text and "--smoke" in help_text  # --fast's and --smoke's help
    comments = (REPO / "configs" / "demo.yaml").read_text()
    assert "fastprompt train configs/demo.yaml method.name=coop output_dir=runs/demo/coop --overwrite" in comments
    assert "fastprompt train configs/smoke.yaml --overwrite" in (REPO / "configs" / "smoke.yaml").read_text()


def test_demo_yaml_matches_the_demo_settings():
    shipped = load_config(REPO / "configs" / "demo.yaml")
    builtin = demo_config(output_dir="runs/demo")
    assert config_to_dict(shipped) == config_to_dict(builtin)
    assert yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["method"]["name"] == "dept+coop"
    assert config_to_dict(load_config(REPO / "configs" / "smoke.yaml")) == config_to_dict(smoke_config())
