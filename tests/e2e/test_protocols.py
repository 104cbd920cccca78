"""Protocols end to end on real images (digits) with the tiny random CLIP: training lowers the
loss, base/new/HM are computed as the protocol defines, checkpoints hold only what trains."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from fastprompt.config import load_config
from fastprompt.metrics import harmonic_mean
from fastprompt.protocols import run_protocol


def test_base2new_trains_on_base_and_reports_hm(tmp_path, digits_root, fast):
    cfg = load_config(None, [*fast, f"data.root={digits_root}", f"output_dir={tmp_path}", "method.name=dept+coop",
                             "train.epochs=8", "optim.lr=0.02", "optim.warmup_epochs=0"])
    results = run_protocol(cfg, say=lambda m: None)
    (run,) = results["runs"]
    losses = run["train"]["epoch_losses"]
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0], losses  # a short run lowers the loss
    assert (run["num_base_classes"], run["num_new_classes"]) == (5, 5)
    assert run["hm"] == pytest.approx(2 * run["base"] * run["new"] / (run["base"] + run["new"]))
    assert results["mean"]["hm"] == pytest.approx(harmonic_mean(run["base"], run["new"]))
    # 5 base classes x 16 shots = 80 images, batch 8: 10 steps per epoch.
    assert run["train"]["steps"] == 80
    # The run folder: config, results, per-seed log, metrics and checkpoint.
    seed_dir = tmp_path / "seed1"
    for name in ("config.yaml", "results.json", "seed1/result.json", "seed1/train.log", "seed1/metrics.jsonl"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((seed_dir / "result.json").read_text())["base"] == run["base"]
    assert len(list((tmp_path / "splits").glob("*.json"))) == 1  # the few-shot sample, cached


def test_checkpoint_holds_only_trainable_tensors(tmp_path, digits_root, fast):
    from fastprompt.clip import load_clip
    from fastprompt.methods import build_model

    cfg = load_config(None, [*fast, f"data.root={digits_root}", f"output_dir={tmp_path}", "train.epochs=1"])
    run_protocol(cfg, say=lambda m: None)
    ckpt = tmp_path / "seed1" / "checkpoints" / (tmp_path / "seed1" / "checkpoints" / "latest").read_text()
    saved = load_file(ckpt / "model.safetensors")
    model = build_model("dept+coop", load_clip("fastprompt-tiny", None), ["zero", "one", "two", "three", "four"])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in trainable.values())
    assert set(saved) == set(model.state_dict())
    clip_numel = sum(p.numel() for p in model.clip.parameters()) if hasattr(model, "clip") else 10**6
    assert sum(t.numel() for t in saved.values()) < clip_numel / 10
    # And they load back into a fresh model.
    model.load_state_dict(saved)
    # Nothing half-written is left next to it.
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["latest", ckpt.name]


def test_few_shot_and_transfer_protocols(tmp_path, digits_root, fast):
    common = [*fast, f"data.root={digits_root}", "train.epochs=1", "method.name=dept+coop"]
    fs = run_protocol(load_config(None, [*common, f"output_dir={tmp_path / 'fs'}", "protocol.name=few_shot",
                                         "protocol.shots=[1,2]"]), say=lambda m: None)
    assert set(fs["results"]) == {"1", "2"}
    assert (tmp_path / "fs" / "shots2" / "seed1" / "result.json").is_file()
    # Cross-dataset with the source itself as target: same class names, so DePT keeps its fused head
    # and the target accuracy equals the source accuracy.
    tr = run_protocol(load_config(None, [*common, f"output_dir={tmp_path / 'tr'}", "protocol.name=cross_dataset",
                                         "protocol.targets=[imagefolder]"]), say=lambda m: None)
    (run,) = tr["runs"]
    assert list(run["targets"]) == ["imagefolder"] and 0 <= run["source"] <= 100
    assert run["targets"]["imagefolder"] == pytest.approx(run["source"])
    assert tr["target_mean"] == pytest.approx(run["source"])


def test_zero_shot_needs_no_training(tmp_path, digits_root, fast):
    cfg = load_config(None, [*fast, f"data.root={digits_root}", f"output_dir={tmp_path}", "method.name=zsclip"])
    results = run_protocol(cfg, say=lambda m: None)
    assert results["runs"][0]["train"] == {} and not (tmp_path / "seed1" / "checkpoints").exists()
    assert math.isfinite(results["mean"]["hm"])


@pytest.mark.parametrize("method", ["dept+coop", "coop"])
def test_domain_generalisation_slices_the_cat_head_to_the_target_classes(method):
    """ImageNet-A/-R style targets: 4 of the 10 training classes, with their indices. DePT's fused
    logits on the subset equal the full model's logits at those columns; other methods just
    switch names."""
    from fastprompt.clip import load_clip
    from fastprompt.data import DatasetSplits
    from fastprompt.protocols import set_target_classes
    from fastprompt.methods import build_model

    names = ["tench", "goldfish", "shark", "cock", "hen", "ostrich", "finch", "junco", "robin", "jay"]
    torch.manual_seed(0)
    model = build_model(method, load_clip("fastprompt-tiny", None), names).eval()
    with torch.no_grad():  # give the CAT head non-trivial weights, as after training
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    images = torch.randn(6, 3, 32, 32)
    rows = [1, 3, 5, 7]
    with torch.no_grad():
        full = model(images).logits
        source = DatasetSplits("imagenet", names, [], [], [])
        set_target_classes(model, source, DatasetSplits("imagenet_a", [names[r] for r in rows], [], [], [], class_indices=rows))
        subset = model(images).logits
        assert subset.shape == (6, 4)
        torch.testing.assert_close(subset, full[:, rows], rtol=1e-5, atol=1e-5)
        if method.startswith("dept+"):
            # Indices that do not name the source's classes (a model trained on another dataset): ITM only.
            other = DatasetSplits("imagenet_a", ["axolotl", "goldfish", "iguana", "jay"], [], [], [], class_indices=rows)
            set_target_classes(model, source, other)
            assert not model.cat_head_active and model(images).logits.shape == (6, 4)
            set_target_classes(model, DatasetSplits("caltech101", names[:3], [], [], []), DatasetSplits(
                "imagenet_r", [names[r] for r in rows], [], [], [], class_indices=rows))
            assert not model.cat_head_active


@pytest.mark.parametrize("method,extra,built,on_dtd", [
    ("zsclip", [], "a centered satellite photo of {}.", "{} texture."),
    ("dept+kgcoop", [], "a centered satellite photo of {}.", "a photo of a {}, a type of texture."),  # KgCoOp's own
    ("zsclip", ["method.options.template=a {}."], "a {}.", "a {}."),  # the user's choice stands
])
def test_methods_use_each_datasets_template(tmp_path, method, extra, built, on_dtd):
    """Each method's per-dataset templates: at build time for the training set, and per target."""
    from fastprompt.protocols import Session

    cfg = load_config(None, ["model.name=fastprompt-tiny", "model.pretrained=null", "train.device=cpu",
                             f"method.name={method}", "data.dataset=eurosat", f"output_dir={tmp_path}", *extra])
    session = Session.open(cfg, say=lambda m: None)
    model = session.build_model(["forest", "river"], 1)
    inner = getattr(model, "base", model)
    assert inner.template == built
    session.use_dataset_template(model, "dtd")
    model.set_classnames(["banded", "dotted"])
    assert inner.template == on_dtd
