"""IVLP and PromptSRC (and their DePT variants) against independent oracles: prompt placement by
open_clip's own blocks on hand-assembled sequences, the frozen branch by open_clip's encode_image /
encode_text, and every loss term by a float64 formula written here."""
import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from fastprompt import build_model, load_clip, method_defaults
from fastprompt.clip import TINY_MODEL
from fastprompt.methods.templates import PROMPTSRC_TEMPLATES

CLASSES = ["dog", "cat", "golden_retriever", "car", "oak tree"]
NEW = ["airplane", "ship", "frog"]
DEEP = {"depth": 2, "vis_depth": 3}  # the tiny model has 3 layers; text and vision depths differ on purpose


@pytest.fixture(scope="module")
def clip():
    return load_clip(TINY_MODEL)


def perturb(model, scale=0.3):
    """Move every trainable tensor off its init, so prompted and frozen predictions differ."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    return model


def batch(n=3, c=len(CLASSES), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, c, (n,), generator=g)


# --- the 60 templates ---------------------------------------------------------------------------

def test_frozen_text_templates_are_clips_first_60():
    clip_80 = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert len(clip_80) == 80
    assert len(PROMPTSRC_TEMPLATES) == 60 and len(set(PROMPTSRC_TEMPLATES)) == 60
    assert set(PROMPTSRC_TEMPLATES) == set(clip_80[:60])
    # PromptSRC's order: "a photo of a {}." first, then the notebook's order.
    assert PROMPTSRC_TEMPLATES == ("a photo of a {}.",) + tuple(t for t in clip_80[:60] if t != "a photo of a {}.")
    assert PROMPTSRC_TEMPLATES[-1] == "itap of the {}." and "a good photo of a {}." not in PROMPTSRC_TEMPLATES


# --- prompt placement: IVLP against open_clip's own blocks --------------------------------------

def open_clip_ivlp_logits(clip, model, images):
    """IVLP computed by open_clip's modules on sequences assembled here from the model's parameters."""
    m = clip.model
    text, vision = model.text_prompts, model.vision_prompts.layers()
    n_t, n_v = text.n_ctx, vision[0].shape[0]
    # Text: "[SOS] ctx_1..ctx_n <name>. [EOS]", the ctx rows replaced before blocks 1..depth-1.
    names = [c.replace("_", " ") for c in model.classnames]
    tokens = clip.tokenizer([f"a photo of a {c}." for c in names])
    x = m.token_embedding(tokens)
    x = torch.cat([x[:, :1], text.ctx.expand(len(names), -1, -1), x[:, 1 + n_t :]], 1) + m.positional_embedding
    for i, block in enumerate(m.transformer.resblocks):
        if 0 < i < len(text.layers()):
            x = torch.cat([x[:, :1], text.layers()[i].expand(len(names), -1, -1), x[:, 1 + n_t :]], 1)
        x = block(x, attn_mask=m.attn_mask)
    g = m.ln_final(x)[torch.arange(len(names)), tokens.argmax(-1)] @ m.text_projection
    # Vision: [CLS, patches, prompts] after the positional embedding, before ln_pre; the last n_v
    # tokens replaced before blocks 1..vis_depth-1; the feature is ln_post(CLS) @ proj.
    v = m.visual
    y = v.conv1(images).flatten(2).transpose(1, 2)
    y = torch.cat([v.class_embedding.view(1, 1, -1).expand(y.shape[0], -1, -1), y], 1) + v.positional_embedding
    y = v.ln_pre(torch.cat([y, vision[0].expand(y.shape[0], -1, -1)], 1))
    for i, block in enumerate(v.transformer.resblocks):
        if 0 < i < len(vision):
            y = torch.cat([y[:, :-n_v], vision[i].expand(y.shape[0], -1, -1)], 1)
        y = block(y)
    f = v.ln_post(y[:, 0]) @ v.proj
    return clip.logit_scale * F.normalize(f, dim=-1) @ F.normalize(g, dim=-1).t()


@pytest.mark.parametrize("depths", [{"depth": 1, "vis_depth": 1}, DEEP], ids=["shallow", "deep"])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_ivlp_places_prompts_like_open_clip_blocks(clip, depths, backend):
    model = perturb(build_model("ivlp", clip, CLASSES, attention_backend=backend, **depths)).eval()
    images, _ = batch()
    with torch.no_grad():
        ours = model(images).logits
        theirs = open_clip_ivlp_logits(clip, model, images)
        plain = open_clip_ivlp_logits(clip, build_model("ivlp", clip, CLASSES, **depths), images)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    assert (ours - plain).abs().max() > 1e-2  # the (perturbed) prompts matter


def test_ivlp_initialises_like_the_official_code(clip):
    model = build_model("ivlp", clip, CLASSES, **DEEP)
    ids = clip.tokenizer(["a photo of a"])
    torch.testing.assert_close(model.text_prompts.ctx, clip.model.token_embedding(ids)[0, 1:5])
    assert model.text_prompts.prefix_text == "a photo of a"
    deep = torch.cat([p.flatten() for p in model.text_prompts.deep] + [p.flatten() for p in model.vision_prompts.layers()])
    assert abs(deep.std().item() - 0.02) < 0.003 and abs(deep.mean().item()) < 0.003  # N(0, 0.02)


def test_state_dict_holds_only_what_trains(clip):
    w_t, w_v = clip.model.transformer.width, clip.model.visual.transformer.width
    for method in ("ivlp", "promptsrc"):
        model = build_model(method, clip, CLASSES, **DEEP)
        model.train()
        model(*batch())  # the frozen branch was used: still nothing of it in the state dict
        state = model.state_dict()
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        assert shapes == {
            "text_prompts.ctx": (4, w_t), "text_prompts.deep.0": (4, w_t),
            "vision_prompts.tokens.0": (4, w_v), "vision_prompts.tokens.1": (4, w_v), "vision_prompts.tokens.2": (4, w_v),
        }
        assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    dept = build_model("dept+promptsrc", clip, CLASSES, **DEEP)
    assert set(dept.state_dict()) == {f"base.{k}" for k in shapes} | {
        "gamma_img", "beta_img", "gamma_txt", "beta_txt", "classifier.weight", "classifier.bias"}


def test_published_defaults():
    d = method_defaults("promptsrc")
    assert (d["n_ctx"], d["n_vis_ctx"], d["depth"], d["vis_depth"], d["ctx_init"]) == (4, 4, 9, 9, "a photo of a")
    assert (d["text_loss_weight"], d["image_loss_weight"], d["gpa"], d["gpa_mean"], d["gpa_std"]) == (25.0, 10.0, True, 15.0, 1.0)
    ivlp = method_defaults("ivlp")
    assert "text_loss_weight" not in ivlp and "gpa_mean" not in ivlp and ivlp["vis_depth"] == 9
    assert method_defaults("dept+promptsrc")["lam"] == 0.7 and method_defaults("dept+promptsrc")["gpa_mean"] == 15.0


@pytest.mark.parametrize(
    "method,options,match",
    [
        ("promptsrc", {"gpa_std": 0.0}, "gpa_std must be a float > 0"),
        ("promptsrc", {"text_loss_weight": -1.0}, "text_loss_weight must be a float >= 0"),
        ("ivlp", {"vis_depth": 4}, "depth must be an int between 1 and 3"),
        ("ivlp", {"n_vis_ctx": 0, "vis_depth": 2, "depth": 2}, "visual prompt tokens must be a positive int"),
        ("promptsrc", {"vis_dept": 2}, "Did you mean 'vis_depth'"),
    ],
)
def test_bad_options(clip, method, options, match):
    with pytest.raises(ValueError, match=match):
        build_model(method, clip, CLASSES, **options)


# --- the losses, against float64 formulas -------------------------------------------------------

def oracle_frozen_text(clip, classnames):
    """g0 by open_clip's encode_text: raw features averaged over the 60 templates, then normalised."""
    names = [c.replace("_", " ") for c in classnames]
    templates = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES][:60]
    with torch.no_grad():
        feats = torch.stack([clip.model.encode_text(clip.tokenizer([t.format(c) for c in names])).double()
                             for t in templates])
    return F.normalize(feats.mean(0), dim=-1)


def oracle_terms(clip, f, g, f0, g0, labels):
    """float64 CE, KL(zero-shot || prompted) / (B C), and the two L1 terms, written out."""
    s = float(clip.logit_scale)
    f, g, f0 = (F.normalize(t.detach().double(), dim=-1) for t in (f, g, f0))
    z, z0 = s * f @ g.t(), s * f0 @ g0.t()
    log_p, log_p0 = z.log_softmax(-1), z0.log_softmax(-1)
    b, c = z.shape
    return {
        "ce": -log_p[torch.arange(b), labels].mean(),
        "kl": (log_p0.exp() * (log_p0 - log_p)).sum() / (b * c),
        "text_l1": (g - g0).abs().sum() / g.numel(),
        "image_l1": (f - f0).abs().sum() / f.numel(),
        "kl_reversed": (log_p.exp() * (log_p - log_p0)).sum() / (b * c),
        "kl_batchmean": (log_p0.exp() * (log_p0 - log_p)).sum() / b,
        "log_p": log_p,
    }


def test_every_loss_term_matches_its_float64_formula(clip):
    model = perturb(build_model("promptsrc", clip, CLASSES, **DEEP))
    model.train()
    images, labels = batch(4)
    out = model(images, labels)
    f, g = model.encode_images(images), model.text_features()
    with torch.no_grad():
        f0 = clip.model.encode_image(images)
    g0 = oracle_frozen_text(clip, CLASSES)
    torch.testing.assert_close(model.frozen_text_features().double(), g0, rtol=1e-5, atol=1e-6)
    want = oracle_terms(clip, f, g, f0, g0, labels)
    terms = model.self_regulating_terms(g, f, model.encode_frozen_images(images))
    for name in ("kl", "text_l1", "image_l1"):
        assert want[name] > 1e-4, name  # a term that is ~0 would check nothing
        torch.testing.assert_close(terms[name].double(), want[name], rtol=1e-4, atol=1e-7, msg=name)
    expected = want["ce"] + want["kl"] + 25 * want["text_l1"] + 10 * want["image_l1"]
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    # Inference: the prompted logits alone.
    torch.testing.assert_close(out.logits.double().log_softmax(-1), want["log_p"], rtol=1e-5, atol=1e-5)


def test_kl_direction_and_scaling(clip):
    model = build_model("promptsrc", clip, CLASSES, **DEEP)
    images, labels = batch(4)
    # Near their init the two predictions are close and KL is almost symmetric: take prompted
    # features far from the frozen ones (peaked predictions against the frozen, flatter ones).
    g = torch.randn(len(CLASSES), clip.embed_dim)
    f = 3 * F.normalize(g[labels], dim=-1) + 0.3 * torch.randn(4, clip.embed_dim)
    f0 = model.encode_frozen_images(images)
    kl = model.self_regulating_terms(g, f, f0)["kl"].double()
    want = oracle_terms(clip, f, g, f0, oracle_frozen_text(clip, CLASSES), labels)
    torch.testing.assert_close(kl, want["kl"], rtol=1e-4, atol=1e-7)
    # The other direction and the batch-mean scaling are different numbers here: the test can tell.
    for wrong in ("kl_reversed", "kl_batchmean"):
        assert abs(kl - want[wrong]) > 0.05 * abs(want[wrong]), wrong


def test_loss_weights_scale_their_terms(clip):
    images, labels = batch()
    losses = {}
    for tw, iw in ((25.0, 10.0), (0.0, 10.0), (25.0, 0.0)):
        torch.manual_seed(3)
        model = perturb(build_model("promptsrc", clip, CLASSES, text_loss_weight=tw, image_loss_weight=iw, **DEEP))
        losses[(tw, iw)] = model(images, labels).loss
    terms = model.self_regulating_terms(model.text_features(), model.encode_images(images), model.encode_frozen_images(images))
    torch.testing.assert_close(losses[(25.0, 10.0)] - losses[(0.0, 10.0)], 25 * terms["text_l1"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses[(25.0, 10.0)] - losses[(25.0, 0.0)], 10 * terms["image_l1"], rtol=1e-4, atol=1e-6)


def test_ivlp_loss_is_cross_entropy_only(clip):
    model = perturb(build_model("ivlp", clip, CLASSES, **DEEP))
    images, labels = batch()
    out = model(images, labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    assert not model.needs_frozen_image_features
    with pytest.raises(ValueError, match="does not use frozen image features"):
        model(images, labels, frozen_image_features=torch.randn(3, clip.embed_dim))


# --- the frozen branch --------------------------------------------------------------------------

def test_frozen_image_features_given_or_computed_give_the_same_loss(clip):
    model = perturb(build_model("dept+promptsrc", clip, CLASSES, **DEEP))
    model.train()
    images, labels = batch(4)
    computed = model(images, labels)
    # As the loop would: the frozen features of several steps' views encoded in one no-grad batch.
    more, _ = batch(6, seed=1)
    with torch.no_grad():
        many = model.encode_frozen_images(torch.cat([more, images]))
    assert not many.requires_grad
    given = model(images, labels, frozen_image_features=many[6:])
    torch.testing.assert_close(given.loss, computed.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(many[6:], clip.model.encode_image(images), rtol=1e-5, atol=1e-5)
    # The argument is used: other images' frozen features give another loss.
    other = model(images, labels, frozen_image_features=many[:4])
    assert abs(other.loss.item() - computed.loss.item()) > 1e-4
    with pytest.raises(ValueError, match="frozen_image_features must be a float tensor \\[4, 64\\]"):
        model(images, labels, frozen_image_features=many[:3])


def test_frozen_text_features_are_encoded_once_per_class_list(clip):
    model = build_model("promptsrc", clip, CLASSES, **DEEP)
    calls = []
    model.text_encoder.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    images, labels = batch()
    model.train()
    model(images, labels).loss.backward()
    assert calls == [len(CLASSES)] * 61  # 60 templates (g0) + the prompted class features
    calls.clear()
    model(images, labels).loss.backward()
    assert calls == [len(CLASSES)]  # every later step: the prompted features only
    calls.clear()
    model.set_classnames(NEW)
    model.eval()
    with torch.no_grad():
        model(images)
    assert calls == [len(NEW)]  # evaluation never needs g0
    calls.clear()
    model.train()
    model(images, labels % len(NEW)).loss.backward()
    assert calls == [len(NEW)] * 61  # a new class list: g0 once
    calls.clear()
    model.set_classnames(CLASSES)
    model(images, labels).loss.backward()
    assert calls == [len(CLASSES)]  # back to a list seen before: kept
    torch.testing.assert_close(model.frozen_text_features().double(), oracle_frozen_text(clip, CLASSES), rtol=1e-5, atol=1e-6)


def test_frozen_text_features_ignore_autocast_and_inference_mode(clip):
    a = build_model("promptsrc", clip, CLASSES, **DEEP)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = a.frozen_text_features()
    assert first.dtype == torch.float32 and not first.is_inference()
    torch.testing.assert_close(first, build_model("promptsrc", clip, CLASSES, **DEEP).frozen_text_features())
    a.train()
    a(*batch()).loss.backward()  # the cached g0 can enter the autograd graph


# --- DePT + PromptSRC ---------------------------------------------------------------------------

def test_dept_promptsrc_objective(clip):
    model = perturb(build_model("dept+promptsrc", clip, CLASSES, **DEEP))
    model.train()
    images, labels = batch(4)
    out = model(images, labels)
    f, g = model.encode_images(images), model.base.text_features()
    with torch.no_grad():
        f0 = clip.model.encode_image(images)
    want = oracle_terms(clip, f, g, f0, oracle_frozen_text(clip, CLASSES), labels)
    # The CAT head on the raw features: the true class's text feature and the image feature (2B rows).
    d = lambda t: t.detach().double()  # noqa: E731
    rows = torch.cat([d(model.gamma_txt) * d(g)[labels] + d(model.beta_txt), d(model.gamma_img) * d(f) + d(model.beta_img)])
    z_cat = rows @ d(model.classifier.weight).t() + d(model.classifier.bias)
    cat_ce = -z_cat.log_softmax(-1)[torch.arange(8), torch.cat([labels, labels])].mean()
    lam = 0.7
    expected = (1 - lam) * want["ce"] + lam * cat_ce + want["kl"] + 25 * want["text_l1"] + 10 * want["image_l1"]
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    # The head trains in its own group (the loop gives it head_lr_mult x the prompt lr).
    groups = model.parameter_groups()
    head = {model.gamma_img, model.beta_img, model.gamma_txt, model.beta_txt, model.classifier.weight, model.classifier.bias}
    assert set(groups) == {"prompt", "head"} and set(groups["head"]) == head
    assert set(groups["prompt"]) == {p for p in model.base.parameters() if p.requires_grad}
    assert model.gpa_settings == (15.0, 1.0) and model.needs_frozen_image_features


def test_dept_promptsrc_fuses_on_training_classes_only(clip):
    model = perturb(build_model("dept+promptsrc", clip, CLASSES, **DEEP)).eval()
    images, _ = batch()
    with torch.no_grad():
        f, g = model.encode_images(images), model.base.text_features()
        z_itm = clip.logit_scale * F.normalize(f, dim=-1) @ F.normalize(g, dim=-1).t()
        z_cat = F.linear(model.gamma_img * f + model.beta_img, model.classifier.weight, model.classifier.bias)
        torch.testing.assert_close(model(images).logits, 0.3 * z_itm + 0.7 * z_cat, rtol=1e-5, atol=1e-5)
        model.set_classnames(NEW)
        torch.testing.assert_close(model(images).logits, model.base(images).logits)


# --- attention backends -------------------------------------------------------------------------

def _loss_and_grads(clip, method, **options):
    torch.manual_seed(5)
    model = perturb(build_model(method, clip, CLASSES[:3], depth=2, vis_depth=2, **options))
    model.train()
    images, labels = batch(2, c=3)
    loss = model(images, labels).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("method", ["promptsrc", "dept+promptsrc"])
def test_backends_agree(clip, method):
    ref_loss, ref_grads = _loss_and_grads(clip, method, attention_backend="reference")
    for backend in ("sdpa", "triton"):
        extra = {"head_backend": "triton"} if backend == "triton" and method.startswith("dept") else {}
        loss, grads = _loss_and_grads(clip, method, attention_backend=backend, **extra)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5, msg=backend)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=backend)


def test_epoch_features_can_carry_the_frozen_branch(clip):
    """The loop's batched path: a chunk of steps' views drawn in step order, their frozen features
    encoded in one no-grad batch; each step gets its views and their frozen features."""
    from fastprompt.data import GpuAugment
    from fastprompt.fast_paths import uses_frozen_image_features
    from fastprompt.training import EpochBatches, FeatureEncoding

    model = perturb(build_model("promptsrc", clip, CLASSES, **DEEP))
    model.train()
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (12, 3, 40, 44), generator=g, dtype=torch.uint8)
    labels = torch.arange(12) % len(CLASSES)

    class Source:
        def batch(self, idx):
            return images[idx], labels[idx]

    augment = GpuAugment(clip.image_size, clip.mean, clip.std)
    order = torch.randperm(12, generator=g)
    frozen_branch = FeatureEncoding(model.encode_frozen_images, steps_per_chunk=2, autocast=torch.no_grad,
                                    keep_views=True)
    steps = EpochBatches(Source(), augment, order, batch_size=4, steps=3, device=torch.device("cpu"),
                         generator=torch.Generator().manual_seed(7), features=frozen_branch)
    ref_gen = torch.Generator().manual_seed(7)
    got = [(views, frozen, y) for (views, frozen), y in steps]
    assert len(got) == 3 and uses_frozen_image_features(model)
    assert not uses_frozen_image_features(build_model("ivlp", clip, CLASSES, **DEEP))
    for i, (views, frozen, y) in enumerate(got):
        expected_views = augment(images[order[i * 4 : (i + 1) * 4]], generator=ref_gen)
        assert torch.equal(views, expected_views) and torch.equal(y, labels[order[i * 4 : (i + 1) * 4]])
        torch.testing.assert_close(model(views, y, frozen_image_features=frozen).loss, model(views, y).loss,
                                   rtol=1e-5, atol=1e-6)


def test_regularisers_are_float32_under_autocast(clip):
    model = perturb(build_model("promptsrc", clip, CLASSES, **DEEP))
    images, _ = batch()
    with torch.no_grad():
        f, g, f0 = model.encode_images(images), model.text_features(), model.encode_frozen_images(images)
        plain = model.self_regulating_terms(g, f, f0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model.self_regulating_terms(g, f, f0)
    for name in plain:
        assert mixed[name].dtype == torch.float32
        torch.testing.assert_close(mixed[name], plain[name], rtol=1e-6, atol=1e-8, msg=name)
