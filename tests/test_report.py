"""`fastprompt report`: the Markdown table (sweep averages = HM of the mean Base and New) and the chart."""
import json

import pytest

from fastprompt.report import markdown_table, write_report


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
