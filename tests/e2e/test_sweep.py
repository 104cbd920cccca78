"""`fastprompt sweep`: runs every (method, dataset, seed), skips finished seeds, resumes interrupted
ones, aggregates into results.json + one report, and emits scheduler command lines."""
import json
import shlex
from pathlib import Path

import pytest
import yaml

from fastprompt.cli import main
from fastprompt.config import ConfigError, config_to_dict, load_config
from fastprompt.sweep import emit_commands, expand, load_sweep, report_folder

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.name=fastprompt-tiny", "model.pretrained=null", "data.shots=2", "data.crop_scale=[0.9,1.0]",
        "train.epochs=2", "train.batch_size=4", "train.precision=fp32", "train.device=cpu", "train.num_workers=0",
        "train.progress=false", "optim.lr=0.05"]


def _sweep_file(tmp_path, digits_root, **extra) -> Path:
    spec = {"protocol": "base2new", "config": str(REPO / "configs" / "smoke.yaml"), "methods": ["coop", "dept+coop"],
            "datasets": ["imagefolder"], "seeds": [1, 2], "overrides": [*TINY, f"data.root={digits_root}"],
            "output_dir": str(tmp_path / "sweep" / "{protocol}" / "{method}" / "{dataset}"),
            "report_dir": str(tmp_path / "sweep" / "report"), **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _trainings(run_dir: Path) -> int:
    log = run_dir / "train.log"
    return log.read_text().count(" parameters on ") if log.exists() else 0


def test_sweep_runs_skips_resumes_and_reports(tmp_path, digits_root, capsys):
    path = _sweep_file(tmp_path, digits_root)
    assert main(["sweep", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 run folders: 2 ran, 0 resumed, 0 already finished" in out
    report = (tmp_path / "sweep" / "report" / "report.md").read_text()
    assert "| coop | imagefolder |" in report and "| dept+coop | imagefolder |" in report
    coop = tmp_path / "sweep" / "base2new" / "coop" / "imagefolder"
    results = json.loads((coop / "results.json").read_text())
    assert results["seeds"] == [1, 2] and [r["seed"] for r in results["runs"]] == [1, 2]
    assert yaml.safe_load((coop / "config.yaml").read_text())["data"]["seeds"] == [1, 2]

    # Everything finished: a rerun trains nothing and rewrites no result.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep").rglob("result*.json")}
    assert main(["sweep", str(path)]) == 0
    assert "2 run folders: 0 ran, 0 resumed, 2 already finished" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # Seed 2 of coop was interrupted after its last checkpoint, before its result; the aggregate is gone.
    (coop / "seed2" / "result.json").unlink()
    (coop / "results.json").unlink()
    assert main(["sweep", str(path)]) == 0
    assert "2 run folders: 0 ran, 1 resumed, 1 already finished" in capsys.readouterr().out
    assert _trainings(coop / "seed1") == 1  # finished seed 1 was not trained again
    assert "resumed from" in (coop / "seed2" / "train.log").read_text()
    again = json.loads((coop / "results.json").read_text())
    assert again["mean"] == pytest.approx(results["mean"], abs=1e-9)  # same checkpoint, same accuracies


def test_emit_commands_one_line_per_run_then_sweep_aggregates(tmp_path, digits_root, capsys):
    path = _sweep_file(tmp_path, digits_root, methods=["coop"])
    assert main(["sweep", str(path), "--emit-commands"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 2 and "when they are done" in captured.err
    run_dir = tmp_path / "sweep" / "base2new" / "coop" / "imagefolder"
    for seed, line in zip([1, 2], lines):
        argv = shlex.split(line)
        assert argv[:2] == ["fastprompt", "train"] and argv[-1] == "--resume"
        assert f"data.seeds=[{seed}]" in argv and f"output_dir={run_dir}" in argv and "method.name=coop" in argv
    # The scheduler runs each line (here: in this process); the sweep then only aggregates.
    for line in lines:
        assert main(shlex.split(line)[1:]) == 0
    capsys.readouterr()
    assert json.loads((run_dir / "results.json").read_text())["seeds"] == [2]  # the last job's own view
    assert main(["sweep", str(path)]) == 0
    assert "1 run folders: 0 ran, 1 resumed, 0 already finished" in capsys.readouterr().out
    assert _trainings(run_dir / "seed1") == 1 and _trainings(run_dir / "seed2") == 1
    assert json.loads((run_dir / "results.json").read_text())["seeds"] == [1, 2]


def test_finished_run_with_a_changed_config_is_an_error_not_a_skip(tmp_path, digits_root, capsys):
    path = _sweep_file(tmp_path, digits_root, methods=["coop", "zsclip"], seeds=[1])
    assert main(["sweep", str(path)]) == 0
    capsys.readouterr()
    # The whole folder is finished (results.json there): still not this config's results.
    assert main(["sweep", str(path), "optim.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.05 -> 0.01" in err and "new output_dir" in err
    # Only the seed's result is there: the same. Zero-shot CLIP has no checkpoint to compare with.
    (tmp_path / "sweep" / "base2new" / "coop" / "imagefolder" / "results.json").unlink()
    assert main(["sweep", str(path), "optim.lr=0.01"]) == 2
    assert "optim.lr: 0.05 -> 0.01" in capsys.readouterr().err
    zs = _sweep_file(tmp_path, digits_root, methods=["zsclip"], seeds=[1])
    (tmp_path / "sweep" / "base2new" / "zsclip" / "imagefolder" / "results.json").unlink()
    assert main(["sweep", str(zs), "method.options.template=a picture of {}."]) == 2
    assert "method.options: {} -> {'template': 'a picture of {}.'}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"method": ["coop"]}, "unknown sweep key 'method'; did you mean 'methods'?"),
        ({"seeds": []}, "'seeds' must be a non-empty list"),
        ({"seeds": ["one"]}, "'seeds' must hold ints"),
        ({"datasets": ["a", "a"]}, "'datasets' lists ['a'] twice"),
        ({"overrides": ["data.seeds=[1]"]}, "the sweep sets data.seeds itself"),
        ({"overrides": ["optim.lrr=1"]}, "did you mean 'optim.lr'"),
        ({"config": None, "configs_dir": "nowhere"}, "no config for method 'coop'"),
        ({"config": None, "methods": ["copo"]}, "unknown method 'copo'; did you mean 'coop'?"),
        ({"config": None, "protocol": "base2old"}, "unknown protocol 'base2old'; did you mean 'base2new'?"),
        ({"output_dir": "runs/{dataset}"}, "use the {method} and {dataset} placeholders"),
        ({"protocol": None}, "'protocol' is required"),
        ({"report_dir": "runs/{protocol}/{method}"}, "uses {method}; one report covers the whole sweep, "
                                                     "so the only placeholder allowed is {protocol}"),
        ({"report_dir": "runs/{protocol"}, "the only placeholder allowed is {protocol}"),
    ],
)
def test_bad_sweep_files_name_the_problem(change, message, tmp_path, digits_root):
    path = _sweep_file(tmp_path, digits_root)
    spec = yaml.safe_load(path.read_text())
    for key, value in change.items():
        if value is None:
            spec.pop(key)
        else:
            spec[key] = value
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as err:
        expand(load_sweep(path))
    assert message in str(err.value)
    assert not (tmp_path / "sweep").exists()  # nothing ran


def test_runs_use_the_shipped_layers_from_any_folder_or_a_configs_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no checkout here: the layers ship inside the package
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"protocol": "base2new", "methods": ["dept+coop", "cocoop"],
                                    "datasets": ["caltech101", "dtd"], "seeds": [1, 2, 3],
                                    "overrides": ["data.root=/data"], "output_dir": str(tmp_path / "{method}/{dataset}")}))
    sweep = load_sweep(path)
    lines = emit_commands(sweep)
    assert len(lines) == 2 * 2 * 3
    assert shlex.split(lines[0])[:6] == ["fastprompt", "train", "--protocol", "base2new", "--method", "dept+coop"]
    cocoop = next(r for r in expand(sweep) if r.method == "cocoop").config()
    assert (cocoop.train.batch_size, cocoop.optim.lr, cocoop.data.dataset) == (1, 0.002, "caltech101")
    published = load_config(REPO / "configs" / "base2new" / "cocoop.yaml", ["data.root=/data",
                                                                            f"output_dir={cocoop.output_dir}"])
    assert config_to_dict(cocoop) == config_to_dict(published)
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "configs_dir": str(REPO / "configs")}))
    lines = emit_commands(load_sweep(path))
    assert str(REPO / "configs" / "base2new" / "dept_coop.yaml") in lines[0]
    assert str(REPO / "configs" / "base2new" / "cocoop.yaml") in lines[-1]


def test_report_folder_defaults_to_the_run_folders_common_parent(tmp_path, digits_root):
    # One method, several output_dir depths: the report goes where the run folders meet, not two
    # levels above the first one.
    path = _sweep_file(tmp_path, digits_root, methods=["coop"], report_dir=None,
                       output_dir=str(tmp_path / "out" / "{method}-{dataset}"))
    spec = yaml.safe_load(path.read_text())
    spec.pop("report_dir")
    path.write_text(yaml.safe_dump(spec))
    sweep = load_sweep(path)
    assert report_folder(sweep, expand(sweep)) == tmp_path / "out"
    both = _sweep_file(tmp_path, digits_root)
    spec = yaml.safe_load(both.read_text())
    spec.pop("report_dir")
    both.write_text(yaml.safe_dump(spec))
    sweep = load_sweep(both)
    assert report_folder(sweep, expand(sweep)) == tmp_path / "sweep" / "base2new"
    named = load_sweep(_sweep_file(tmp_path, digits_root, report_dir=str(tmp_path / "r" / "{protocol}")))
    assert report_folder(named, expand(named)) == tmp_path / "r" / "base2new"
