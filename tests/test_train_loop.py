"""The training loop's mechanics on a small stand-alone model: schedule, optimiser groups,
loss going down, and resume-after-crash reproducing the uninterrupted run bit for bit."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fastprompt.config import ConfigError, load_config
from fastprompt.training import build_optimizer, epoch_lr, fit, steps_per_epoch


class TinyPromptModel(nn.Module):
    """A frozen random 'encoder' with a trainable prompt vector and a trainable linear head."""

    def __init__(self, num_classes=3, dim=8):
        super().__init__()
        self.encoder = nn.Linear(3 * 4 * 4, dim).requires_grad_(False)
        self.prompt = nn.Parameter(torch.zeros(dim))
        self.head = nn.Linear(dim, num_classes)

    def parameter_groups(self):
        return {"prompt": [self.prompt], "head": list(self.head.parameters())}

    def forward(self, images, labels=None):
        logits = self.head(self.encoder(images.flatten(1)) + self.prompt)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(logits=logits.float(), loss=loss)


class InMemorySource:
    def __init__(self, n=24, num_classes=3):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n) % num_classes
        # Class-dependent means make the task learnable.
        self.images = torch.randn(n, 3, 4, 4, generator=g) * 0.5 + self.labels.view(-1, 1, 1, 1).float()

    def batch(self, indices):
        return self.images[indices], self.labels[indices]


def flip_augment(images, generator=None):
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def _cfg(tmp_path, *extra):
    return load_config(None, [f"output_dir={tmp_path}", "train.epochs=4", "train.batch_size=4",
                              "train.precision=fp32", "train.device=cpu", "train.progress=false",
                              "optim.lr=0.05", "train.log_every=2", *extra])


def test_epoch_lr_matches_dassl_constant_warmup_cosine():
    cfg = load_config().optim
    lrs = [epoch_lr(0.0035, e, epochs=10, cfg=cfg) for e in range(10)]
    # Dassl's wrapper: constant warm-up, then torch's CosineAnnealingLR(T_max=10), which is stepped
    # only after the warm-up epoch (so its first value, the full lr, is used once).
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0035)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    expected = []
    for e in range(10):
        if e < cfg.warmup_epochs:
            expected.append(cfg.warmup_lr)
        else:
            expected.append(cosine.get_last_lr()[0])
            opt.step()  # (an epoch of training; keeps torch's step-order check quiet)
            cosine.step()
    assert lrs[0] == 1e-5 and lrs[1] == pytest.approx(0.0035)
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))


def test_head_group_gets_head_lr_mult_and_any_optimizer_by_name():
    model = TinyPromptModel()
    opt = build_optimizer(model, load_config().optim)
    assert isinstance(opt, torch.optim.SGD)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"prompt": pytest.approx(0.0035), "head": pytest.approx(0.0035 * 6.5)}
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 5e-4
    adamw = build_optimizer(model, load_config(None, ["optim.name=AdamW", "optim.options.betas=[0.8,0.9]"]).optim)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.8, 0.9)
    with pytest.raises(ConfigError, match="did you mean 'adamw'"):
        build_optimizer(model, load_config(None, ["optim.name=adamww"]).optim)


def test_steps_per_epoch_drops_the_last_partial_batch():
    assert steps_per_epoch(80, 4) == 20 and steps_per_epoch(81, 4) == 20 and steps_per_epoch(3, 4) == 1


def test_fit_lowers_the_loss_and_writes_run_files(tmp_path):
    torch.manual_seed(1)
    model = TinyPromptModel()
    result = fit(model, InMemorySource(), flip_augment, _cfg(tmp_path, "optim.warmup_epochs=0"), tmp_path, seed=1)
    assert result.steps == 4 * 6 and len(result.epoch_losses) == 4
    assert result.epoch_losses[-1] < 0.7 * result.epoch_losses[0]
    assert (tmp_path / "train.log").read_text().count("epoch 4/4") == 1
    assert (tmp_path / "metrics.jsonl").read_text().count('"event": "epoch"') == 4
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000024"


@pytest.mark.parametrize("precision, extra", [("fp32", []), ("bf16", ["optim.grad_clip=0.5"]),
                                              ("fp16", ["optim.name=adamw"])])
def test_resume_after_crash_equals_uninterrupted(tmp_path, precision, extra):
    overrides = [f"train.precision={precision}", *extra]
    torch.manual_seed(7)
    straight = TinyPromptModel()
    fit(straight, InMemorySource(), flip_augment, _cfg(tmp_path / "a", *overrides), tmp_path / "a", seed=3)

    calls = {"n": 0}

    def crashing_augment(images, generator=None):  # dies in the middle of epoch 3
        calls["n"] += 1
        if calls["n"] == 2 * 6 + 3:
            raise KeyboardInterrupt("simulated kill")
        return flip_augment(images, generator)

    torch.manual_seed(7)
    first = TinyPromptModel()
    with pytest.raises(KeyboardInterrupt):
        fit(first, InMemorySource(), crashing_augment, _cfg(tmp_path / "b", *overrides), tmp_path / "b", seed=3)
    torch.manual_seed(7)
    resumed = TinyPromptModel()
    result = fit(resumed, InMemorySource(), flip_augment, _cfg(tmp_path / "b", *overrides), tmp_path / "b",
                 seed=3, resume=True)
    assert result.resumed_from_step == 2 * 6 and result.steps == 4 * 6
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6)
    assert [p.requires_grad for p in resumed.parameters()] == [p.requires_grad for p in straight.parameters()]


def test_resume_refuses_a_changed_config(tmp_path):
    fit(TinyPromptModel(), InMemorySource(), flip_augment, _cfg(tmp_path, "train.epochs=1"), tmp_path, seed=1)
    with pytest.raises(ConfigError, match=r"optim.lr: 0.05 -> 0.1"):
        fit(TinyPromptModel(), InMemorySource(), flip_augment, _cfg(tmp_path, "train.epochs=1", "optim.lr=0.1"),
            tmp_path, seed=1, resume=True)


def test_optimiser_settings_torch_refuses_are_config_errors():
    cfg = load_config(None, ["optim.name=adamw", "optim.options.betas=[2, 3]"]).optim
    with pytest.raises(ConfigError, match=r"torch.optim.AdamW refuses these settings .*betas=\(2, 3\).*: Invalid beta"):
        build_optimizer(TinyPromptModel(), cfg)


def test_settings_that_are_valid_but_rarely_meant_are_warnings():
    from fastprompt.protocols.session import setting_warnings

    assert setting_warnings(load_config(None, ["train.epochs=5"])) == []
    warnings = setting_warnings(load_config(None, ["train.epochs=2", "optim.warmup_epochs=2",
                                                   "protocol.targets=[dtd]"]))
    assert any("protocol.targets=['dtd'] is ignored" in w and "base2new" in w for w in warnings)
    assert any("every epoch trains at the warm-up lr 1e-05 and optim.lr=0.0035 is never used" in w for w in warnings)
    assert setting_warnings(load_config(None, ["train.epochs=1", "method.name=zsclip"])) == []
