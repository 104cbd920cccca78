"""Gaussian prompt aggregation: the epoch weights, the aggregate, and resume through a real
checkpoint aggregating bit for bit as an uninterrupted run."""
import math

import pytest
import torch

from fastprompt import build_model, load_clip
from fastprompt.checkpoint import load_checkpoint, optimizer_state_from_flat, optimizer_state_to_flat, save_checkpoint
from fastprompt.clip import TINY_MODEL
from fastprompt.methods.gpa import GaussianPromptAggregation, gpa_weights

CLASSES = ["dog", "cat", "car"]


def normal_pdf(x, mean, std):
    return math.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


def test_base_to_new_weights():
    w = gpa_weights(15, 1, 20)
    assert [round(x, 3) for x in w[12:17]] == [0.054, 0.242, 0.399, 0.242, 0.054]  # epochs 13..17
    assert math.isclose(sum(w), 1.0, rel_tol=1e-12)
    assert max(w[:12] + w[17:]) < 0.0045


@pytest.mark.parametrize("mean,std,epochs", [(15, 1, 20), (30, 30, 50), (45, 5, 50), (6, 10, 20), (2.5, 0.3, 4)])
def test_weights_are_the_normalised_density(mean, std, epochs):
    density = [normal_pdf(e, mean, std) for e in range(1, epochs + 1)]
    expected = [d / sum(density) for d in density]
    for got, want in zip(gpa_weights(mean, std, epochs), expected):
        assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-300)


def test_a_mean_far_past_the_last_epoch_does_not_underflow():
    w = gpa_weights(1000, 1, 5)  # every density underflows to 0.0 in float64
    assert all(math.isfinite(x) for x in w) and w[-1] == 1.0


@pytest.mark.parametrize("mean,std,epochs,match", [
    (15, 0, 20, "gpa_std must be a float > 0"), (15, -1, 20, "gpa_std"), (float("nan"), 1, 20, "gpa_mean must be a finite"),
    (15, 1, 0, "epochs must be a positive int"), (True, 1, 20, "gpa_mean"),
])
def test_bad_settings(mean, std, epochs, match):
    with pytest.raises(ValueError, match=match):
        gpa_weights(mean, std, epochs)


@pytest.fixture(scope="module")
def clip():
    return load_clip(TINY_MODEL)


def test_which_methods_aggregate(clip):
    small = {"depth": 2, "vis_depth": 2}
    gpa = GaussianPromptAggregation.for_model(build_model("dept+promptsrc", clip, CLASSES, **small), 20)
    assert (gpa.mean, gpa.std, gpa.epochs) == (15.0, 1.0, 20)
    custom = GaussianPromptAggregation.for_model(build_model("promptsrc", clip, CLASSES, gpa_mean=6, gpa_std=10, **small), 20)
    assert (custom.mean, custom.std) == (6.0, 10.0)
    for method, options in (("ivlp", small), ("dept+ivlp", small), ("promptsrc", {"gpa": False, **small}), ("coop", {})):
        assert GaussianPromptAggregation.for_model(build_model(method, clip, CLASSES, **options), 20) is None


# --- training with GPA, as the loop drives it -----------------------------------------------------

EPOCHS, STEPS = 4, 2


def new_run(clip):
    torch.manual_seed(0)
    model = build_model("dept+promptsrc", clip, CLASSES, depth=2, vis_depth=2, gpa_mean=2.5, gpa_std=1.0)
    groups = model.parameter_groups()
    optimizer = torch.optim.SGD([{"params": groups["prompt"], "lr": 0.05}, {"params": groups["head"], "lr": 0.3}],
                                momentum=0.9, weight_decay=5e-4)
    return model, optimizer, GaussianPromptAggregation.for_model(model, EPOCHS)


def train_epoch(model, optimizer, epoch):
    data = torch.Generator().manual_seed(100 + epoch)
    model.train()
    for _ in range(STEPS):
        images = torch.randn(2, 3, 32, 32, generator=data)
        labels = torch.randint(0, len(CLASSES), (2,), generator=data)
        optimizer.zero_grad()
        model(images, labels).loss.backward()
        optimizer.step()


def test_aggregate_is_the_weighted_average_of_every_trainable_tensor(clip):
    model, optimizer, gpa = new_run(clip)
    snapshots = []
    for epoch in range(1, EPOCHS + 1):
        train_epoch(model, optimizer, epoch)
        gpa.accumulate(model.state_dict(), epoch)
        snapshots.append({k: v.detach().double().clone() for k, v in model.state_dict().items()})
    aggregate = gpa.aggregate()
    assert set(aggregate) == set(model.state_dict())
    assert {"classifier.weight", "gamma_img", "base.vision_prompts.tokens.1"} <= set(aggregate)  # the head too
    w = gpa_weights(2.5, 1.0, EPOCHS)
    for name, value in aggregate.items():
        want = sum(w[e] * snapshots[e][name] for e in range(EPOCHS))
        torch.testing.assert_close(value.double(), want, rtol=1e-6, atol=1e-7, msg=name)
        assert not torch.allclose(value.double(), snapshots[-1][name])  # not simply the last epoch
    raw = model.state_dict()["classifier.weight"].clone()
    gpa.apply(model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, aggregate[name].to(value.dtype))
    assert not torch.equal(model.state_dict()["classifier.weight"], raw)


def train(clip, tmp_path, interrupt_after=None):
    model, optimizer, gpa = new_run(clip)
    start = 1
    if interrupt_after is not None:
        for epoch in range(1, interrupt_after + 1):
            train_epoch(model, optimizer, epoch)
            gpa.accumulate(model.state_dict(), epoch)
        # The checkpoint: trainable weights, optimiser, and the aggregator's state.
        optim_tensors, optim_rest = optimizer_state_to_flat(optimizer.state_dict())
        state = gpa.state_dict()
        save_checkpoint(tmp_path, step=interrupt_after * STEPS, model_state=model.state_dict(),
                        trainer_tensors={**optim_tensors, **{f"gpa.{k}": v for k, v in state["tensors"].items()}},
                        meta={"optimizer": optim_rest, "gpa": state["meta"]})
        del model, optimizer, gpa
        # A new process: everything rebuilt, then restored from the checkpoint.
        ckpt = load_checkpoint(tmp_path)
        model, optimizer, gpa = new_run(clip)
        model.load_state_dict(ckpt.model_state)
        optimizer.load_state_dict(optimizer_state_from_flat(ckpt.trainer_tensors, ckpt.meta["optimizer"]))
        gpa.load_state_dict({"meta": ckpt.meta["gpa"],
                             "tensors": {k[4:]: v for k, v in ckpt.trainer_tensors.items() if k.startswith("gpa.")}})
        start = interrupt_after + 1
    for epoch in range(start, EPOCHS + 1):
        train_epoch(model, optimizer, epoch)
        gpa.accumulate(model.state_dict(), epoch)
    gpa.apply(model)
    return model.state_dict()


def test_resumed_run_aggregates_exactly_as_an_uninterrupted_one(clip, tmp_path):
    straight = train(clip, tmp_path / "a")
    resumed = train(clip, tmp_path / "b", interrupt_after=2)
    assert set(straight) == set(resumed)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_misuse_is_refused(clip):
    model, _, gpa = new_run(clip)
    state = model.state_dict()
    with pytest.raises(ValueError, match="expects epoch 1 of 4 next, got epoch 2"):
        gpa.accumulate(state, 2)
    gpa.accumulate(state, 1)
    with pytest.raises(ValueError, match="expects epoch 2 of 4 next, got epoch 1"):
        gpa.accumulate(state, 1)
    with pytest.raises(ValueError, match="seen 1 of 4 epochs"):
        gpa.aggregate()
    with pytest.raises(ValueError, match="keys changed"):
        gpa.accumulate({"other": torch.zeros(2)}, 2)
    other = GaussianPromptAggregation(15, 1, EPOCHS)
    with pytest.raises(ValueError, match="saved with mean, std, epochs = \\(2.5, 1.0, 4\\)"):
        other.load_state_dict(gpa.state_dict())
    with pytest.raises(ValueError, match="damaged GPA state"):
        fresh = GaussianPromptAggregation(2.5, 1.0, EPOCHS)
        fresh.load_state_dict({"meta": gpa.state_dict()["meta"], "tensors": {}})


# --- the training loop (fit) with GPA: stopped by SIGTERM, resumed, the same aggregate --------------

FIT_EPOCHS = 4


class _Source:
    """12 synthetic uint8 training images (3 steps of 4 per epoch), as TrainImageCache holds them."""

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.images = torch.randint(0, 256, (12, 3, 36, 36), generator=g, dtype=torch.uint8)
        self.labels = torch.arange(12) % len(CLASSES)

    def batch(self, indices):
        return self.images[indices], self.labels[indices]


def _fit(clip, out, *, resume=False):
    from fastprompt.config import load_config
    from fastprompt.data import GpuAugment
    from fastprompt.training import fit

    torch.manual_seed(0)
    model = build_model("dept+promptsrc", clip, CLASSES, depth=2, vis_depth=2, gpa_mean=2.5, gpa_std=1.0)
    # feature_batch_size 8: the frozen image features of 2 steps per no-grad batch.
    cfg = load_config(None, [f"output_dir={out}", f"train.epochs={FIT_EPOCHS}", "train.batch_size=4",
                             "train.precision=fp32", "train.device=cpu", "train.progress=false", "optim.lr=0.05",
                             "train.feature_batch_size=8", "method.name=dept+promptsrc"])
    fit(model, _Source(), GpuAugment(clip.image_size, clip.mean, clip.std), cfg, out, seed=1, resume=resume)
    return model


@pytest.mark.parametrize("stop_after_step, where", [(7, "inside epoch 3"), (6, "at the end of epoch 2")])
def test_fit_stopped_by_sigterm_and_resumed_ends_with_the_same_aggregate(clip, tmp_path, monkeypatch, stop_after_step,
                                                                         where):
    import os
    import signal

    import fastprompt.training.loop as loop
    from fastprompt.training import TrainingInterrupted

    snapshots = []
    accumulate = GaussianPromptAggregation.accumulate

    def recording(self, state, epoch):
        snapshots.append({k: v.detach().double().clone() for k, v in state.items()})
        accumulate(self, state, epoch)

    monkeypatch.setattr(GaussianPromptAggregation, "accumulate", recording)
    straight = _fit(clip, tmp_path / "straight").state_dict()
    monkeypatch.setattr(GaussianPromptAggregation, "accumulate", accumulate)
    # fit leaves the Gaussian-weighted average of the epoch-end states in the model, not the last one.
    w = gpa_weights(2.5, 1.0, FIT_EPOCHS)
    assert len(snapshots) == FIT_EPOCHS
    for name, value in straight.items():
        want = sum(w[e] * snapshots[e][name] for e in range(FIT_EPOCHS))
        torch.testing.assert_close(value.double(), want, rtol=1e-6, atol=1e-7, msg=name)
        assert not torch.allclose(value.double(), snapshots[-1][name]), name

    step = loop.train_step
    calls = {"n": 0}

    def step_then_sigterm(*args, **kwargs):
        loss = step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == stop_after_step:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler asks for a stop at this step
        return loss

    monkeypatch.setattr(loop, "train_step", step_then_sigterm)
    with pytest.raises(TrainingInterrupted):
        _fit(clip, tmp_path / "stopped")
    monkeypatch.setattr(loop, "train_step", step)
    ckpt = load_checkpoint(tmp_path / "stopped" / "checkpoints")
    assert ckpt.meta["step"] == stop_after_step and ckpt.meta["batch_in_epoch"] == stop_after_step % 3, where
    assert ckpt.meta["gpa"]["epochs_done"] == 2  # the aggregate as it stood: epochs 1 and 2
    assert {f"gpa.{k}" for k in straight} <= set(ckpt.trainer_tensors)

    resumed = _fit(clip, tmp_path / "stopped", resume=True).state_dict()
    assert set(resumed) == set(straight)
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    # What fit leaves in the model is what its last checkpoint holds: the aggregate.
    final = load_checkpoint(tmp_path / "stopped" / "checkpoints")
    assert final.meta["gpa"]["epochs_done"] == FIT_EPOCHS
    for name in straight:
        assert torch.equal(final.model_state[name], straight[name]), name
