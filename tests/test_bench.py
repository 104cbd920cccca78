"""The official-style baseline computes the same model as fastprompt's path (only slower), and
`fastprompt bench train` works end to end in its CPU smoke mode (what CI runs)."""
from __future__ import annotations

import json
import time

import pytest
import torch

from fastprompt.bench import PhaseClock, Stepper, speedups
from fastprompt.bench.synthetic import class_names, synthetic_jpegs
from fastprompt.cli import build_parser, main
from fastprompt.clip import TINY_MODEL, load_clip
from fastprompt.fast_paths import text_encoders
from fastprompt.methods import build_model
from fastprompt.official import CpuAugmentDataset, build_official_model, official_clip, train_transform


def test_official_style_model_is_fastprompts_model_in_fp16_at_77_tokens():
    torch.manual_seed(0)
    clip32 = load_clip(TINY_MODEL, None)
    torch.manual_seed(0)
    clip16 = official_clip(TINY_MODEL, None, "cpu")
    names = class_names(6)
    torch.manual_seed(1)
    fast = build_model("dept+coop", clip32, names)
    torch.manual_seed(1)
    official = build_official_model("dept+coop", clip16, names)
    lengths = {}
    for key, model in (("fast", fast), ("official", official)):
        enc = text_encoders(model)[0]
        enc.blocks[0].ln_1.register_forward_pre_hook(lambda m, a, key=key: lengths.update({key: a[0].shape[1]}))
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 5, 2])
    with torch.no_grad():
        ref = fast(images, labels)
        got = official(images.half(), labels)
    assert lengths["official"] == 77 and lengths["fast"] < 77  # the whole context vs the cut prompts
    assert next(official.parameters()).dtype == torch.float32  # what trains: fp32 masters
    assert text_encoders(official)[0].dtype == torch.float16
    # Same function, fp16 rounding apart.
    rel = (got.logits - ref.logits).norm() / ref.logits.norm()
    assert rel < 2e-2 and abs(float(got.loss) - float(ref.loss)) < 2e-2 * abs(float(ref.loss))


def test_cpu_augment_dataset_decodes_bytes_and_files(tmp_path):
    clip = load_clip(TINY_MODEL, None)
    data = synthetic_jpegs(2, clip.image_size, seed=0)
    path = tmp_path / "x.jpg"
    path.write_bytes(data[1])
    ds = CpuAugmentDataset([data[0], str(path)], [3, 4], train_transform(clip))
    for i, label in enumerate([3, 4]):
        image, y = ds[i]
        assert image.shape == (3, clip.image_size, clip.image_size) and image.dtype == torch.float32 and y == label
        assert image.std() > 0.1  # normalised real pixels, not a blank
    with pytest.raises(ValueError, match="labels"):
        CpuAugmentDataset(data, [1], train_transform(clip))


def test_phase_clock_reports_self_times_of_nested_phases():
    clock = PhaseClock(torch.device("cpu"))
    with clock.phase("outer"):
        time.sleep(0.03)
        with clock.phase("inner"):
            time.sleep(0.05)
    totals = clock.totals()
    assert totals["inner"] >= 0.05 and 0.03 <= totals["outer"] < totals["inner"]
    assert clock.totals() == {}  # read once


def bench_train(*argv):
    """`fastprompt bench train ARGV` through the command's own parser; the result JSON's path."""
    import dataclasses

    from fastprompt.bench import BenchOptions, run_bench

    args = build_parser().parse_args(["bench", "train", *argv])
    return run_bench(BenchOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchOptions)}))


@pytest.mark.parametrize("style", ["fast", "official"])
def test_stepper_trains_and_counts_model_flops(style):
    torch.manual_seed(0)
    clip = official_clip(TINY_MODEL, None, "cpu") if style == "official" else load_clip(TINY_MODEL, None)
    stepper = Stepper(style, clip, "coop", 4, 5, device=torch.device("cpu"), feature_batch=8)
    ctx = stepper.model.text_prompts.ctx
    before = ctx.detach().clone()
    losses = [float(stepper.step()) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))) and not torch.equal(ctx.detach(), before)
    assert stepper.steps_per_cycle == (2 if style == "fast" else 1)
    if style == "fast":
        flops = stepper.model_flops_per_step()
        # At least the image encoder's patch embedding and the text trunk's matmuls of one step.
        assert flops > 2 * 4 * 16 * (3 * 8 * 8) * 96


@pytest.mark.parametrize("style", ["fast", "official"])
def test_promptsrc_steps_batch_the_frozen_branch_on_the_fast_path_only(style):
    """The fast style encodes the frozen image features of a whole cycle (feature_batch images) in
    one no-grad batch; the official style runs the frozen encoder again in every step, as PromptSRC's
    code does. Both time it as its own phase; the depths are clipped to the tiny model's 3 layers."""
    from fastprompt.bench import method_options
    from fastprompt.bench.timing import PhaseClock as Clock

    torch.manual_seed(0)
    clip = official_clip(TINY_MODEL, None, "cpu") if style == "official" else load_clip(TINY_MODEL, None)
    assert method_options("dept+promptsrc", clip) == {"depth": 3, "vis_depth": 3}
    clock = Clock(torch.device("cpu"))
    stepper = Stepper(style, clip, "dept+promptsrc", 4, 5, device=torch.device("cpu"), feature_batch=8, clock=clock)
    inner = stepper.model.base
    sizes = []
    frozen = inner.encode_frozen_images
    inner.encode_frozen_images = lambda images: sizes.append(images.shape[0]) or frozen(images)
    before = inner.vision_prompts.tokens[1].detach().clone()
    losses = [float(stepper.step()) for _ in range(4)]
    assert all(torch.isfinite(torch.tensor(losses))) and not torch.equal(inner.vision_prompts.tokens[1], before)
    assert sizes == ([8, 8] if style == "fast" else [4] * 4)
    assert stepper.steps_per_cycle == (2 if style == "fast" else 1)
    assert {"image_encoder", "frozen_image_encoder", "text_encoder", "head", "backward"} <= set(clock.totals())


def test_bench_train_smoke_writes_json_chart_and_report(tmp_path, capsys):
    path = bench_train("--smoke", "--out", str(tmp_path), "--run", "dept+coop", "--max-batch", "dept+coop",
                       "--vision-mfu", "maple", "--precompute", "coop", "maple")
    result = json.loads(path.read_text())
    env, cfg = result["environment"], result["config"]
    assert result["benchmark"] == "train" and cfg["mode"] == "smoke" and cfg["model"] == TINY_MODEL
    assert env["versions"]["torch"] == torch.__version__ and env["date"] and env["bf16_matmul"]["flops_per_s"] > 0
    steps = result["steps"]
    assert {(r["method"], r["style"]) for r in steps} == {(m, s) for m in ("coop", "dept+coop") for s in ("fast", "official")}
    for r in steps:
        assert not r["oom"] and r["images_per_s"] > 0 and r["step_ms"] > 0
        assert set(r["breakdown_ms"]) == {"data", "image_encoder", "text_encoder", "head", "backward", "optimizer"}
        assert all(v >= 0 for v in r["breakdown_ms"].values())
        assert r["model_flops_per_step"] > 0 and 0 < r["mfu"]
    assert len(result["speedups"]) == 2 and all(s["speedup"] > 0 for s in result["speedups"])
    runs = result["whole_runs"]
    assert [(r["method"], r["style"]) for r in runs] == [("dept+coop", "fast"), ("dept+coop", "official")]
    assert all(r["seconds"] > 0 and 0 <= r["accuracy"]["base"] <= 100 for r in runs)
    assert [r["largest_batch"] for r in result["largest_batch"]] == [8, 8]  # CPU: the smoke search's cap
    (vision,) = result["vision_mfu"]
    assert vision["method"] == "maple" and vision["batch"] == 4 and vision["flops"] > 0 and vision["mfu"] > 0
    assert cfg["precompute_features"] is True  # the grid steps as training does by default
    coop, maple = result["precompute"]
    assert coop["applies"] and coop["feature_batch"] == 8 and coop["steps"] == 2  # whole cycles of 8 / 4 steps
    assert len(coop["on_step_ms_passes"]) == len(coop["off_step_ms_passes"]) == 1
    assert coop["ratio"] == pytest.approx(coop["on_step_ms"] / coop["off_step_ms"])
    assert maple == {"method": "maple", "batch": 4, "classes": 5, "feature_batch": 8, "applies": False}
    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()
    capsys.readouterr()
    assert main(["bench", "report", str(path)]) == 0
    printed = capsys.readouterr().out
    assert png.is_file() and "| coop | 4 | 5 | fast |" in printed
    assert "precompute coop B=4 C=5 (feature batch 8): " in printed and "maple B=4 C=5 (feature batch 8): not applicable" in printed
    assert main(["bench", "report", str(png)]) == 2  # not a result: one line, no traceback
    assert "is not valid JSON" in capsys.readouterr().err


def test_speedups_pair_styles_and_mark_oom():
    recs = [{"method": "coop", "batch": 4, "classes": 5, "style": "fast", "images_per_s": 30.0},
            {"method": "coop", "batch": 4, "classes": 5, "style": "official", "images_per_s": 5.0},
            {"method": "coop", "batch": 8, "classes": 5, "style": "fast", "images_per_s": 40.0},
            {"method": "coop", "batch": 8, "classes": 5, "style": "official", "oom": True}]
    recs += [{"method": "coop", "batch": 16, "classes": 5, "style": "fast", "error": "RuntimeError: boom"},
             {"method": "coop", "batch": 16, "classes": 5, "style": "official", "images_per_s": 5.0}]
    rows = speedups(recs)
    assert rows[0]["speedup"] == pytest.approx(6.0)
    assert rows[1]["speedup"] is None and rows[1]["official_oom"] is True
    assert rows[2]["speedup"] is None and rows[2]["official_oom"] is False


def test_an_unexpected_error_is_recorded_on_full_runs_and_raised_in_smoke_mode():
    from fastprompt.bench.suite import guarded

    def broken(x):
        raise KeyError(f"no {x}")

    assert guarded(False, {"method": "coop"}, broken, "y") == {"method": "coop", "error": "KeyError: 'no y'"}
    with pytest.raises(KeyError):
        guarded(True, {}, broken, "y")


@pytest.mark.parametrize("style", ["fast", "official"])
def test_throughput_pass_records_no_phases(style, monkeypatch):
    # The breakdown pass times phases; the images/s passes after it must not (no events, no records).
    import fastprompt.bench.steps as bench

    clocks = []

    class Recorder(PhaseClock):
        def __init__(self, device):
            super().__init__(device)
            clocks.append(self)

    monkeypatch.setattr(bench, "PhaseClock", Recorder)
    clip = official_clip(TINY_MODEL, None, "cpu") if style == "official" else load_clip(TINY_MODEL, None)
    record = bench.bench_step(clip, "coop", 4, 5, style, device=torch.device("cpu"), steps=2, warmup=1,
                              feature_batch=8, text_chunk_size=None, compile=False, num_workers=0, repeats=2)
    assert not record["oom"] and record["images_per_s"] > 0 and record["breakdown_ms"]["data"] >= 0
    (clock,) = clocks
    assert clock._records == [] and clock._stack == []


@pytest.mark.parametrize("argv, message", [
    (["--batches", "0"], "argument --batches: must be >= 1, got 0"),
    (["--classes", "5", "-3"], "argument --classes: must be >= 1, got -3"),
    (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    (["--run-epochs", "two"], "argument --run-epochs: expected a whole number >= 1, got 'two'"),
    (["--run-classes", "0"], "argument --run-classes: must be >= 1, got 0"),
    (["--run-shots", "0"], "argument --run-shots: must be >= 1, got 0"),
    (["--run-test-per-class", "0"], "argument --run-test-per-class: must be >= 1, got 0"),
])
def test_bench_counts_must_be_positive(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "train", "--smoke", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_whole_runs_use_one_feature_cache_per_method_and_style(tmp_path, monkeypatch):
    import fastprompt.bench.suite as suite

    seen = []

    def fake_run(style, method, **kwargs):
        seen.append((style, method, kwargs["feature_cache_dir"]))
        return {"style": style, "method": method, "seconds": 1.0}

    monkeypatch.setattr(suite, "whole_run", fake_run)
    bench_train("--smoke", "--no-steps", "--out", str(tmp_path), "--run", "coop", "dept+coop")
    assert len(seen) == 4
    assert len({cache for _, _, cache in seen}) == 4  # (method, style) pairs never share test features
