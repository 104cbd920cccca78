"""Every method builds, runs forward and backward, trains only what it should, and switches
classes; DePT fuses on base classes and is ITM-only on new ones."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fastprompt import METHOD_NAMES, build_model, load_clip, method_defaults
from fastprompt.clip import TINY_MODEL
from fastprompt.kernels import reference as R

CLASSES = ["dog", "cat", "golden_retriever", "car", "oak tree"]
NEW = ["airplane", "ship", "frog"]
VARIANTS = [(m, {}) for m in METHOD_NAMES] + [
    ("dpl", {"modality": "text"}),
    ("dpl", {"modality": "vision"}),
    ("dpl", {"instance_mix": "learned", "prompt_mix": "detached"}),
    ("dept+dpl", {"modality": "text", "language_conditioned": False}),
]


@pytest.fixture(scope="module")
def clip():
    return load_clip(TINY_MODEL)


def make(method, clip, classes=CLASSES, **options):
    for key in ("depth", "vis_depth"):
        if key in method_defaults(method):
            options.setdefault(key, 2)  # the tiny model has 3 layers
    return build_model(method, clip, classes, **options)


def batch(n=3, c=len(CLASSES)):
    return torch.randn(n, 3, 32, 32), torch.arange(n) % c


@pytest.mark.parametrize("method,options", VARIANTS, ids=[f"{m}{o}" for m, o in VARIANTS])
def test_forward_backward_and_only_prompts_train(clip, method, options):
    model = make(method, clip, **options)
    frozen_before = copy.deepcopy(clip.model.state_dict())
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    images, labels = batch()
    out = model(images, labels)
    assert out.logits.shape == (3, len(CLASSES)) and out.logits.dtype == torch.float32
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    if method == "zsclip":
        assert trainable == [] and model.parameter_groups() == {}
        return
    optim = torch.optim.SGD(trainable, lr=0.1, momentum=0.9, weight_decay=5e-4)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert all(p.grad is None for p in clip.model.parameters())
    optim.step()
    for name, tensor in clip.model.state_dict().items():
        assert torch.equal(tensor, frozen_before[name]), f"frozen CLIP tensor {name} changed"
    # The state dict holds exactly the trainable tensors, and they round-trip.
    state = model.state_dict()
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    other = make(method, clip, **options)
    other.load_state_dict(state)
    model.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(images).logits, model(images).logits)


def test_backbone_stays_in_eval_mode(clip):
    model = make("dept+maple", clip)
    model.train()
    assert model.training and model.classifier.training
    for encoder in (model.base.image_encoder, model.base.text_encoder):
        assert not any(m.training for m in encoder.modules())


@pytest.mark.parametrize("method", ["coop", "cocoop", "kgcoop", "maple", "dpl", "ivlp", "promptsrc"])
def test_switching_classnames_matches_a_fresh_build(clip, method):
    torch.manual_seed(1)
    model = make(method, clip).eval()
    images, _ = batch()
    model.set_classnames(NEW)
    fresh = make(method, clip, NEW).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(images).logits, fresh(images).logits)
    assert model(images).logits.shape == (3, len(NEW))


def test_zero_shot_is_clip(clip):
    model = make("zsclip", clip).eval()
    images, _ = batch()
    tokens = clip.tokenizer([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES])
    with torch.no_grad():
        expected = clip.logit_scale * F.normalize(clip.model.encode_image(images), dim=-1) @ F.normalize(clip.model.encode_text(tokens), dim=-1).t()
        torch.testing.assert_close(model(images).logits, expected, rtol=1e-4, atol=1e-4)


def test_kgcoop_regulariser_vanishes_at_its_template_init(clip):
    # ctx initialised from "a photo of a" + "{}." reproduces the hand-crafted prompt exactly.
    model = make("kgcoop", clip)
    with torch.no_grad():
        assert model.regularizer(model.text_features()).abs().item() < 1e-5
        model.text_prompts.ctx.add_(0.5 * torch.randn_like(model.text_prompts.ctx))
        assert model.regularizer(model.text_features()).item() > 1e-4
    assert make("dept+kgcoop", clip).base.kg_weight == 2.0 and model.kg_weight == 8.0


def test_cocoop_text_features_are_per_image(clip):
    model = make("cocoop", clip)
    images, _ = batch(2)
    with torch.no_grad():
        features = model.text_features(model.encode_images(images))
    assert features.shape == (2, len(CLASSES), clip.embed_dim)
    assert not torch.allclose(features[0], features[1])


def test_dpl_with_exact_mixing_is_maple(clip):
    """Decoupled attention with exact rules and no language conditioning is standard attention."""
    maple = make("maple", clip)
    dpl = make("dpl", clip, instance_mix="exact", prompt_mix="exact", language_conditioned=False)
    dpl.load_state_dict(maple.state_dict())
    images, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(dpl(images).logits, maple(images).logits, rtol=1e-5, atol=1e-4)
        dpl_default = make("dpl", clip)
        dpl_default.load_state_dict(maple.state_dict())
        assert not torch.allclose(dpl_default(images).logits, maple(images).logits, atol=1e-3)


def test_dpl_backends_agree(clip):
    # Exact rules with language conditioning: sdpa takes its masked path, reference the decoupled op.
    torch.manual_seed(2)
    exact = dict(instance_mix="exact", prompt_mix="exact", language_conditioned=True)
    ref = make("dpl", clip, attention_backend="reference", **exact)
    sdpa = make("dpl", clip, attention_backend="sdpa", **exact)
    sdpa.load_state_dict(ref.state_dict())
    images, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(ref(images).logits, sdpa(images).logits, rtol=1e-4, atol=1e-4)


def test_image_prompted_methods_refuse_precomputed_features(clip):
    assert make("maple", clip).image_prompted and make("dept+dpl", clip).image_prompted
    assert not make("dept+coop", clip).image_prompted
    with pytest.raises(ValueError, match="cannot be precomputed"):
        make("maple", clip).forward_features(torch.randn(2, clip.embed_dim))
    model = make("dept+coop", clip).eval()
    images, labels = batch()
    with torch.no_grad():
        features = model.encode_images(images)
        torch.testing.assert_close(model.forward_features(features).logits, model(images).logits)


# --- DePT ---------------------------------------------------------------------------------------

def _randomise_head(model):
    with torch.no_grad():
        for p in (model.gamma_img, model.beta_img, model.gamma_txt, model.beta_txt):
            p.add_(0.1 * torch.randn_like(p))


def test_dept_base_inference_fuses_and_new_is_itm_only(clip):
    model = make("dept+coop", clip).eval()
    _randomise_head(model)
    images, _ = batch()
    with torch.no_grad():
        f_i = model.encode_images(images)
        f_t = model.base.text_features()
        z_itm = R.itm_logits(f_i, f_t, clip.logit_scale)
        z_cat = F.linear(model.gamma_img * f_i + model.beta_img, model.classifier.weight, model.classifier.bias)
        torch.testing.assert_close(model(images).logits, 0.3 * z_itm + 0.7 * z_cat, rtol=1e-5, atol=1e-5)
        model.fuse = False
        torch.testing.assert_close(model(images).logits, z_cat, rtol=1e-5, atol=1e-5)
        model.set_classnames(NEW)
        assert not model.cat_head_active
        torch.testing.assert_close(model(images).logits, model.base(images).logits)
        model.set_classnames(CLASSES)
        assert model.cat_head_active


def test_dept_training_loss_is_the_paper_loss(clip):
    model = make("dept+kgcoop", clip)
    _randomise_head(model)
    images, labels = batch()
    out = model(images, labels)
    f_i = model.encode_images(images)
    f_t = model.base.text_features()
    head = dict(gamma_img=model.gamma_img, beta_img=model.beta_img, gamma_txt=model.gamma_txt, beta_txt=model.beta_txt,
                weight=model.classifier.weight, bias=model.classifier.bias, logit_scale=clip.logit_scale)
    expected = R.cat_head_loss(f_i, f_t, labels, **head, lam=0.7) + model.base.regularizer(f_t)
    torch.testing.assert_close(out.loss, expected)
    groups = model.parameter_groups()
    assert set(groups) == {"prompt", "head"} and len(groups["head"]) == 6


def test_dept_classifier_rows_for_a_class_subset(clip):
    model = make("dept+coop", clip).eval()
    images, _ = batch()
    with torch.no_grad():
        full = model(images).logits
        model.set_classnames([CLASSES[3], CLASSES[1]], cat_head_rows=[3, 1])
        torch.testing.assert_close(model(images).logits, full[:, [3, 1]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="out of range: \\[9\\]"):
        model.set_classnames(["a", "b"], cat_head_rows=[0, 9])
    assert model.classnames == [CLASSES[3], CLASSES[1]]  # a refused switch leaves the model as it was


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "method,options,match",
    [
        ("coap", {}, "unknown method 'coap'. Did you mean coop"),
        ("dept+dept", {}, "unknown method"),
        ("coop", {"nctx": 4}, "unknown option 'nctx' for method coop. Did you mean 'n_ctx'"),
        ("coop", {"n_ctx": "16"}, "option n_ctx='16' of coop must be int"),
        ("coop", {"n_ctx": 0}, "n_ctx must be a positive int"),
        ("coop", {"ctx_init": "a photo of a", "n_ctx": 9}, "n_ctx=9 must be between 1 and the 4 tokens"),
        ("maple", {"depth": 7}, "depth must be an int between 1 and 3"),
        ("dept+coop", {"lam": 1.5}, "lam must be a float in \\[0, 1\\]"),
        ("dept+coop", {"head_backend": "cuda"}, "head_backend='cuda'"),
        ("dpl", {"modality": "audio"}, "modality='audio'"),
        ("dpl", {"instance_mix": "soft"}, "instance_mix='soft' is not a mixing rule"),
        ("dpl", {"instance_mix": "learned", "instance_weight": 1.0}, "must lie in \\(0, 1\\)"),
        ("coop", {"attention_backend": "flash"}, "attention_backend='flash'"),
        ("zsclip", {"template": "a photo"}, "must contain '\\{\\}'"),
        ("dpl", {"n_vis_ctx": 8}, "n_vis_ctx of dpl do nothing with modality='multimodal'"),
        ("dept+dpl", {"modality": "vision", "ctx_init": "a photo"}, "ctx_init of dept\\+dpl do nothing"),
    ],
)
def test_bad_options(clip, method, options, match):
    with pytest.raises(ValueError, match=match):
        build_model(method, clip, CLASSES, **options)


def test_bad_classnames_and_labels(clip):
    with pytest.raises(ValueError, match="non-empty list"):
        build_model("coop", clip, [])
    with pytest.raises(ValueError, match="non-empty strings"):
        build_model("coop", clip, ["dog", ""])
    model = make("coop", clip)
    with pytest.raises(ValueError, match="labels must be an int64 tensor of shape \\[3\\]"):
        model(torch.randn(3, 3, 32, 32), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="state dict does not match"):
        model.load_state_dict({"text_prompts.ctx": torch.zeros(1)} | {"extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="shapes do not match.*another class count"):
        make("dept+coop", clip).load_state_dict(make("dept+coop", clip, NEW).state_dict())
    assert model.load_state_dict(make("coop", clip).state_dict()).missing_keys == []
    out = model(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2], dtype=torch.int32))  # int32 labels work
    assert torch.isfinite(out.loss)


def test_method_defaults_are_the_published_ones():
    assert method_defaults("coop")["n_ctx"] == 16
    assert method_defaults("cocoop")["ctx_init"] == "a photo of a"
    assert method_defaults("maple")["depth"] == 9 and method_defaults("maple")["n_ctx"] == 2
    d = method_defaults("dept+kgcoop")
    assert d["lam"] == 0.7 and d["kg_weight"] == 2.0 and method_defaults("kgcoop")["kg_weight"] == 8.0


def test_evaluation_encodes_the_class_prompts_once(clip, monkeypatch):
    model = make("dept+maple", clip).eval()
    calls = []
    real = model.base.text_features
    monkeypatch.setattr(model.base, "text_features", lambda f=None: calls.append(1) or real(f))
    images, labels = batch()
    with torch.no_grad():
        first = model(images).logits
        torch.testing.assert_close(model(images).logits, first)
    assert len(calls) == 1  # the second batch reused the features
    with torch.no_grad():
        model.base.text_prompts.ctx.add_(0.1)  # a training step changes the prompts in place
        assert not torch.allclose(model(images).logits, first)
        model.set_classnames(NEW)
        assert model(images).logits.shape == (3, len(NEW))
    assert len(calls) == 3
    model(images, labels).loss.backward()  # with gradients: always computed afresh
    assert len(calls) == 4
