"""`fastprompt report`: the Markdown table (sweep averages = HM of the mean Base and New) and the chart."""
import json

import pytest

from fastprompt.errors import ResultsError
from fastprompt.report import load_results, markdown_table, write_report


def _b2n(method, dataset, base, new):
    hm = 2 * base * new / (base + new)
    return {"protocol": "base2new", "method": method, "dataset": dataset, "model": "ViT-B-16", "seeds": [1, 2, 3],
            "mean": {"base": base, "new": new, "hm": hm}, "runs": [{"train": {"images_per_s": 100.0}}]}


def test_sweep_table_averages_then_takes_hm(tmp_path):
    runs = [_b2n("dept+coop", "eurosat", 90.0, 60.0), _b2n("dept+coop", "dtd", 80.0, 50.0)]
    dirs = []
    for i, r in enumerate(runs):
        d = tmp_path / f"run{i}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(r))
        dirs.append(d)
    md, chart = write_report(dirs, tmp_path / "out")
    text = md.read_text()
    assert "| dept+coop | eurosat | 90.00 | 60.00 | 72.00 |" in text
    # mean base 85, mean new 55: HM of the means 66.79 (not the mean of the HMs, 66.77)
    assert "| **dept+coop** | **average of 2** | 85.00 | 55.00 | 66.79 |" in text
    assert chart.read_bytes()[:4] == b"\x89PNG"


def test_transfer_and_few_shot_tables():
    transfer = {"protocol": "cross_dataset", "method": "coop", "dataset": "imagenet", "model": "ViT-B-16",
                "seeds": [1], "targets": ["dtd", "eurosat"],
                "mean": {"source": 71.5, "targets": {"dtd": 44.0, "eurosat": 46.0}}, "target_mean": 45.0}
    few = {"protocol": "few_shot", "method": "coop", "dataset": "dtd", "model": "ViT-B-16", "seeds": [1],
           "results": {"1": {"mean": 40.0}, "16": {"mean": 63.5}}}
    text = markdown_table([transfer, few])
    assert "| coop | imagenet | 71.50 | 44.00 | 46.00 | 45.00 |" in text
    assert "| coop | dtd | 40.00 | 63.50 |" in text and "1-shot | 16-shot" in text


def test_missing_results_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json"):
        write_report([tmp_path])


def _with_config(result: dict, **changes) -> dict:
    """A base-to-new result with a full config (what a run writes), `changes` as "section.key": value."""
    from fastprompt.config import config_to_dict, load_config

    config = config_to_dict(load_config(None, [f"method.name={result['method']}", f"data.dataset={result['dataset']}",
                                               *(f"{k}={v}" for k, v in changes.items())]))
    return {**result, "config": config, "shots": config["data"]["shots"], "seeds": config["data"]["seeds"]}


def _write(tmp_path, runs) -> list:
    dirs = []
    for i, r in enumerate(runs):
        d = tmp_path / f"run{i}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(r))
        dirs.append(d)
    return dirs


def test_runs_with_different_settings_are_labelled_and_averaged_apart(tmp_path):
    runs = [_with_config(_b2n("coop", "dtd", 80.0, 60.0), **{"data.shots": 1}),
            _with_config(_b2n("coop", "eurosat", 90.0, 70.0), **{"data.shots": 1}),
            _with_config(_b2n("coop", "dtd", 70.0, 50.0), **{"data.shots": 16}),
            _with_config(_b2n("coop", "eurosat", 60.0, 40.0), **{"data.shots": 16})]
    md, _ = write_report(_write(tmp_path, runs), tmp_path / "out")
    text = md.read_text()
    assert "| method | dataset | setting | Base | New | HM | train images/s |" in text
    assert "| coop | dtd | data.shots=1 | 80.00 | 60.00 |" in text
    assert "| coop | dtd | data.shots=16 | 70.00 | 50.00 |" in text
    # one average per setting, never over both shot counts
    assert "| **coop** | **average of 2** | data.shots=1 | 85.00 | 65.00 |" in text
    assert "| **coop** | **average of 2** | data.shots=16 | 65.00 | 45.00 |" in text
    assert "average of 4" not in text


def test_a_training_key_that_differs_within_a_method_labels_its_rows(tmp_path):
    runs = [_with_config(_b2n("coop", "dtd", 80.0, 60.0)),
            _with_config(_b2n("coop", "eurosat", 90.0, 70.0), **{"optim.lr": 0.01}),
            _with_config(_b2n("dept+coop", "dtd", 85.0, 65.0))]  # another method's own settings: no label
    text = markdown_table(load_results(_write(tmp_path, runs)))
    assert "| coop | dtd | optim.lr=0.0035 |" in text and "| coop | eurosat | optim.lr=0.01 |" in text
    assert "| dept+coop | dtd | optim.lr=0.0035 |" in text and "average" not in text


def test_the_same_run_twice_is_refused(tmp_path):
    run = _with_config(_b2n("coop", "dtd", 80.0, 60.0))
    first, second = _write(tmp_path, [run, run])
    with pytest.raises(ResultsError, match=f"{first} is given twice"):
        write_report([first, first])
    with pytest.raises(ResultsError, match=f"{first} and {second} hold the same run \\(coop on dtd\\)"):
        write_report([first, second])
    # imagefolder: the tree is the dataset, so two trees are two datasets
    trees = [_with_config(_b2n("coop", "imagefolder", 80.0, 60.0), **{"data.root": f"/data/{name}"})
             for name in ("birds", "cars")]
    text = markdown_table(load_results(_write(tmp_path / "trees", trees)))
    assert "| coop | imagefolder | data.root=/data/birds |" in text
    assert "| coop | imagefolder | data.root=/data/cars |" in text


def test_warnings_are_listed_under_the_table(tmp_path):
    run = {**_b2n("coop", "dtd", 80.0, 60.0), "warnings": ["dtd: 1 class(es) have no test images ('x')"]}
    md, _ = write_report(_write(tmp_path, [run]), tmp_path / "out")
    text = md.read_text()
    assert "#### Warnings\n\n- coop / dtd: dtd: 1 class(es) have no test images ('x')\n" in text
    assert text.index("#### Warnings") > text.index("| coop | dtd |")
