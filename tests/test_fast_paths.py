"""The exact speed-ups change nothing but speed (tiny random CLIP, fp32, CPU):

* text encoded only up to the longest real prompt == the official 77-token path;
* text encoded in checkpointed chunks == all at once (values and gradients);
* training on image features precomputed in large batches == step-by-step image encoding, and the
  same for PromptSRC's frozen-branch image features;
* accuracy from cached test-image features == streaming the images, and the cache is reused.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fastprompt.clip import TINY_MODEL, load_clip
from fastprompt.config import load_config
from fastprompt.errors import ConfigError
from fastprompt.fast_paths import configure_text, text_encoders, uses_image_features
from fastprompt.methods import build_model
from fastprompt.metrics import backbone_fingerprint
from fastprompt.training import EpochBatches, FeatureEncoding, fit

NAMES = ["cat", "sea lion", "golden retriever dog", "fire truck", "a", "hot air balloon", "tree"]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(TINY_MODEL, None)


def _model(clip, method, names=NAMES, seed=1, **options):
    torch.manual_seed(seed)
    if method.endswith(("maple", "dpl", "ivlp", "promptsrc")):
        options.setdefault("depth", 3)  # the tiny model has 3 layers per tower
    if method.endswith(("ivlp", "promptsrc")):
        options.setdefault("vis_depth", 3)
    model = build_model(method, clip, names, **options)
    # Non-trivial trainables (DePT's head starts as identity/zero, CoOp ctx small): perturb them.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def _loss_and_grads(model, images, labels):
    model.zero_grad(set_to_none=True)
    out = model(images, labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def _assert_same(a, b, tol=2e-5):
    (la, lossa, ga), (lb, lossb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=tol, atol=tol)
    torch.testing.assert_close(lossa, lossb, rtol=tol, atol=tol)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["coop", "dept+kgcoop", "maple", "cocoop"])
def test_truncated_text_equals_the_official_77_token_path(clip, method):
    model = _model(clip, method)
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 6])
    fast = _loss_and_grads(model, images, labels)
    encoder = text_encoders(model)[0]
    # The fast path really is shorter: the longest prompt here ends well before position 77.
    assert int(encoder.pool_index(model.text_prompts.class_tokens.token_ids if hasattr(model, "text_prompts")
                                  else model.base.text_prompts.class_tokens.token_ids).max()) + 1 < 30
    configure_text(model, truncate=False)
    assert encoder.truncate is False
    _assert_same(fast, _loss_and_grads(model, images, labels))


@pytest.mark.parametrize("method,options", [("coop", {}), ("dept+cocoop", {}), ("dpl", {"instance_mix": "learned"})])
def test_chunked_text_encoding_equals_one_pass(clip, method, options):
    model = _model(clip, method, **options)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 5])
    whole = _loss_and_grads(model, images, labels)
    calls = []
    encoder = text_encoders(model)[0]
    hook = encoder.blocks[0].ln_1.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    configure_text(model, chunk_size=3)
    chunked = _loss_and_grads(model, images, labels)
    hook.remove()
    rows = len(NAMES) * (2 if "cocoop" in method else 1)
    # Chunks of at most 3 prompts, each run twice (forward, then recomputed for the backward).
    assert max(calls) == 3 and sum(calls) == 2 * rows
    _assert_same(whole, chunked)
    with torch.no_grad():  # inference: chunks without checkpointing, same features
        torch.testing.assert_close(model(images).logits, whole[0], rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="chunk size"):
        configure_text(model, chunk_size=0)


def test_chunked_text_encoding_keeps_a_fraction_of_the_activations_for_backward(clip):
    """The memory side of chunking (what lets ImageNet's 1000 classes fit): autograd keeps each
    chunk's input instead of every layer's activations of every prompt."""
    model = _model(clip, "coop", [f"class {i}" for i in range(40)])

    def saved_bytes():
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model.forward_features(torch.randn(4, clip.embed_dim), torch.tensor([0, 1, 2, 3])).loss
        loss.backward()
        return total[0]

    whole = saved_bytes()
    configure_text(model, chunk_size=8)
    assert saved_bytes() < whole / 10


class _Source:
    """Synthetic uint8 training images of one size, as TrainImageCache holds them."""

    def __init__(self, n, num_classes, size=40):
        g = torch.Generator().manual_seed(3)
        self.images = torch.randint(0, 256, (n, 3, size, size + 6), generator=g, dtype=torch.uint8)
        self.labels = torch.arange(n) % num_classes

    def batch(self, indices):
        return self.images[indices], self.labels[indices]


def _fit(clip, method, tmp_path, precompute, *, names=NAMES[:5], n=14):
    from fastprompt.data import GpuAugment

    model = _model(clip, method, names)
    cfg = load_config(None, [f"output_dir={tmp_path}", "train.epochs=2", "train.batch_size=4", "train.precision=fp32",
                             "train.device=cpu", "train.progress=false", "optim.lr=0.05", "optim.warmup_epochs=0",
                             "train.feature_batch_size=8", f"train.precompute_features={precompute}"])
    augment = GpuAugment(clip.image_size, clip.mean, clip.std)
    batch_sizes = []
    encode = model.encode_images

    def counting_encode(images):
        batch_sizes.append(images.shape[0])
        return encode(images)

    model.encode_images = counting_encode
    result = fit(model, _Source(n, len(names)), augment, cfg, tmp_path, seed=1)
    del model.encode_images
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return result, state, batch_sizes


@pytest.mark.parametrize("method", ["coop", "dept+cocoop"])
def test_training_on_precomputed_image_features_equals_step_by_step(clip, method, tmp_path):
    plain, plain_state, plain_sizes = _fit(clip, method, tmp_path / "plain", False)
    fast, fast_state, fast_sizes = _fit(clip, method, tmp_path / "fast", True)
    # 14 images, batch 4: 3 steps per epoch; plain encodes 4 at a time, precompute 2 steps (8) then 1.
    assert plain_sizes == [4] * 6 and fast_sizes == [8, 4] * 2
    assert plain.steps == fast.steps == 6
    assert fast.epoch_losses == pytest.approx(plain.epoch_losses, rel=1e-5, abs=1e-6)
    assert plain_state.keys() == fast_state.keys()
    for key in plain_state:
        torch.testing.assert_close(fast_state[key], plain_state[key], rtol=1e-4, atol=1e-6, msg=key)


def test_train_log_says_where_the_image_features_come_from(clip, tmp_path):
    """train.log names the feature path a run took and the setting behind it."""
    _, _, sizes = _fit(clip, "coop", tmp_path / "off", "false")
    assert sizes == [4] * 6
    assert "image features: encoded in each step (train.precompute_features=false)" in (
        tmp_path / "off" / "train.log").read_text()
    _fit(clip, "coop", tmp_path / "on", "true")
    assert "image features: encoded ahead in no-grad batches of 8 images (train.precompute_features=true)" in (
        tmp_path / "on" / "train.log").read_text()
    with pytest.raises(ConfigError, match=r"train.precompute_features: expected bool, got 'sometimes'"):
        load_config(None, ["train.precompute_features=sometimes"])


@pytest.mark.parametrize("method", ["promptsrc", "dept+promptsrc"])
def test_training_on_batched_frozen_image_features_equals_step_by_step(clip, method, tmp_path):
    """PromptSRC's frozen branch: the loop encodes the frozen image features of 2 steps' views in one
    no-grad batch (feature_batch_size 8 / batch 4) instead of one extra encoder call per step."""
    def fit_counting(out, precompute):
        model = _model(clip, method, NAMES[:5], gpa=False)
        cfg = load_config(None, [f"output_dir={out}", "train.epochs=2", "train.batch_size=4", "train.precision=fp32",
                                 "train.device=cpu", "train.progress=false", "optim.lr=0.05", "optim.warmup_epochs=0",
                                 "train.feature_batch_size=8", f"train.precompute_features={precompute}"])
        inner = getattr(model, "base", model)
        sizes = {"prompted": [], "frozen": []}
        encode, frozen = inner.encode_images, inner.encode_frozen_images
        inner.encode_images = lambda images: sizes["prompted"].append(images.shape[0]) or encode(images)
        inner.encode_frozen_images = lambda images: sizes["frozen"].append(images.shape[0]) or frozen(images)
        result = fit(model, _Source(14, 5), GpuAugment(clip.image_size, clip.mean, clip.std), cfg, out, seed=1)
        del inner.encode_images, inner.encode_frozen_images
        return result, {k: v.clone() for k, v in model.state_dict().items()}, sizes

    from fastprompt.data import GpuAugment

    plain, plain_state, plain_sizes = fit_counting(tmp_path / "plain", False)
    fast, fast_state, fast_sizes = fit_counting(tmp_path / "fast", True)
    # 14 images, batch 4: 3 steps per epoch; the prompted encoder runs per step either way.
    assert plain_sizes == {"prompted": [4] * 6, "frozen": [4] * 6}
    assert fast_sizes == {"prompted": [4] * 6, "frozen": [8, 4] * 2}
    assert fast.epoch_losses == pytest.approx(plain.epoch_losses, rel=1e-5, abs=1e-6)
    assert plain_state.keys() == fast_state.keys()
    for key in plain_state:
        torch.testing.assert_close(fast_state[key], plain_state[key], rtol=1e-4, atol=1e-6, msg=key)


def test_epoch_features_draw_the_same_views_and_record_generator_states(clip):
    from fastprompt.data import GpuAugment

    model = _model(clip, "coop", NAMES[:5])
    source, augment = _Source(12, 5), GpuAugment(clip.image_size, clip.mean, clip.std)
    order = torch.randperm(12)
    gen = torch.Generator().manual_seed(7)
    feats = EpochBatches(source, augment, order, batch_size=4, steps=3, first=1, device=torch.device("cpu"),
                         generator=gen, features=FeatureEncoding(model.encode_images, 5, torch.no_grad))
    got = list(feats)
    ref_gen = torch.Generator().manual_seed(7)
    for i, (f, y) in enumerate(got, start=1):
        images, labels = source.batch(order[i * 4 : (i + 1) * 4])
        with torch.no_grad():
            expected = model.encode_images(augment(images, generator=ref_gen))
        torch.testing.assert_close(f, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(y, labels)
        assert torch.equal(feats.generator_state_after(i), ref_gen.get_state())
    assert len(got) == 2
    assert uses_image_features(model) and not uses_image_features(_model(clip, "maple", NAMES[:5]))


# ---------------------------------------------------------------------------- evaluation feature cache


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from fastprompt.data import write_digits_imagefolder

    return write_digits_imagefolder(tmp_path_factory.mktemp("digits") / "data", image_size=32)


def _session(digits, out, *extra):
    from fastprompt.protocols import Session

    cfg = load_config(None, [f"output_dir={out}", "model.name=fastprompt-tiny", "model.pretrained=null",
                             "data.dataset=imagefolder", f"data.root={digits}", "train.precision=fp32",
                             "train.device=cpu", "train.num_workers=0", "train.progress=false",
                             "train.eval_batch_size=16", "method.name=dept+coop", *extra])
    return Session.open(cfg, say=lambda msg: None)


def test_cached_eval_features_give_the_same_accuracy_and_are_reused(digits, tmp_path):
    from fastprompt.data import split_base_new

    cached = _session(digits, tmp_path / "a")
    plain = _session(digits, tmp_path / "b", "train.feature_cache=false")
    base, new = split_base_new(cached.load_splits())
    model = cached.build_model(base.classnames, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    for split in (base, new):
        model.set_classnames(split.classnames)
        acc_cached, _ = cached.accuracy(model, split.test)
        acc_plain, _ = plain.accuracy(model, split.test)
        assert acc_cached == pytest.approx(acc_plain, abs=1e-9)
    cache = cached.evaluator.feature_cache
    assert cache.encoded == len(base.test) + len(new.test) and plain.evaluator.feature_cache is None
    # Another epoch / seed / method on the same backbone: nothing is encoded again, even from disk.
    model.set_classnames(base.classnames)
    cached.accuracy(model, base.test)
    assert cache.encoded == len(base.test) + len(new.test)
    again = _session(digits, tmp_path / "a")
    other = again.build_model(base.classnames, seed=2)
    again.accuracy(other, base.test)
    assert again.evaluator.feature_cache.encoded == 0 and again.evaluator.feature_cache.fingerprint == cache.fingerprint


def test_text_chunk_size_reaches_every_text_encoder(digits, tmp_path):
    session = _session(digits, tmp_path, "train.text_chunk_size=2", "method.name=dept+kgcoop")
    model = session.build_model(["zero", "one", "two"], seed=1)
    assert [enc.chunk_size for enc in text_encoders(model)] == [2]


def test_backbone_fingerprint_follows_weights_activation_and_precision(clip):
    fp = backbone_fingerprint(clip, "fp32")
    assert backbone_fingerprint(clip, "fp32") == fp and backbone_fingerprint(clip, "bf16") != fp
    other = load_clip(TINY_MODEL, None)
    assert backbone_fingerprint(other, "fp32") == fp  # the same weights
    # The same weights under QuickGELU give other features: features cached under GELU must not be reused.
    assert backbone_fingerprint(dataclasses.replace(other, activation="quick_gelu"), "fp32") != fp
    with torch.no_grad():
        other.model.visual.transformer.resblocks[-1].mlp.c_proj.bias[0] += 1e-3  # one weight, deep inside
    assert backbone_fingerprint(other, "fp32") != fp


# ---------------------------------------------------------------------------- compiled encoders


def test_compiled_encoders_do_not_recompile_when_the_classes_change(clip):
    from torch._dynamo.testing import CompileCounter

    from fastprompt.compiled import compile_encoders

    torch._dynamo.reset()
    eager = _model(clip, "dept+coop", NAMES[:3])
    compiled = _model(clip, "dept+coop", NAMES[:3])
    counter = CompileCounter()  # counts the graphs dynamo compiles (a recompile adds one)
    compile_encoders(compiled, backend=counter)
    feats, labels = torch.randn(4, clip.embed_dim), torch.tensor([0, 1, 1, 0])
    lists = [NAMES[:3], NAMES[2:], ["a", "very long class name with many many words in it, longer than any"]]
    for names in lists:
        for m in (eager, compiled):
            m.set_classnames(names)
        torch.testing.assert_close(compiled.forward_features(feats).logits, eager.forward_features(feats).logits)
    out = compiled.forward_features(feats, labels)
    out.loss.backward()
    assert counter.frame_count == 1  # one text trunk graph for 3 class counts and 3 prompt lengths
    for batch in (3, 5, 6):  # the image trunk: one graph for every batch size
        images = torch.randn(batch, 3, 32, 32)
        torch.testing.assert_close(compiled.encode_images(images), eager.encode_images(images))
    assert counter.frame_count == 2
    torch._dynamo.reset()


def test_fit_with_compile_matches_eager_and_new_classes_reuse_the_compiled_code(clip, tmp_path):
    """The real inductor path on the CPU (about half a minute of compiling): training, then a
    class switch (base -> new) that must not compile again."""
    from torch._dynamo.utils import counters

    from fastprompt.data import GpuAugment

    torch._dynamo.reset()
    results, models = {}, {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model("coop", clip, NAMES[:3], n_ctx=4)
        cfg = load_config(None, [f"output_dir={tmp_path / str(compiled)}", "train.epochs=1", "train.batch_size=4",
                                 "train.precision=fp32", "train.device=cpu", "train.progress=false",
                                 "optim.lr=0.05", "optim.warmup_epochs=0", f"train.compile={compiled}"])
        augment = GpuAugment(clip.image_size, clip.mean, clip.std)
        results[compiled] = fit(model, _Source(12, 3), augment, cfg, tmp_path / str(compiled), seed=1)
        models[compiled] = model
    assert results[True].epoch_losses == pytest.approx(results[False].epoch_losses, rel=1e-4)
    assert counters["stats"]["unique_graphs"] >= 2  # the text trunk (with grad) and the image trunk
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        models[True](images)  # evaluation runs the text trunk without grad: its own graph, once
        graphs = counters["stats"]["unique_graphs"]
        for names in (NAMES[3:], ["x", "y"]):  # two one-token names (a name twice is refused)
            for m in models.values():
                m.set_classnames(names)
            torch.testing.assert_close(models[True](images).logits, models[False](images).logits,
                                       rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


def test_eval_feature_cache_with_repeated_paths(tmp_path):
    """A test list that repeats an image must not shift later features onto the wrong images."""
    from fastprompt.data import Sample
    from fastprompt.metrics import EvalFeatureCache

    paths = {}
    for name in "abcd":
        paths[name] = tmp_path / "imgs" / f"{name}.png"
        paths[name].parent.mkdir(exist_ok=True)
        paths[name].write_bytes(name.encode())
    value = {str(p): float(i) for i, p in enumerate(paths.values())}  # the "feature" of each file

    def encode(samples):  # two batches, each with its sample indices, like encode_samples
        for start in range(0, len(samples), 2):
            idx = torch.arange(start, min(start + 2, len(samples)))
            yield torch.tensor([[value[samples[i].path]] for i in idx.tolist()]), idx

    def samples(names):
        return [Sample(str(paths[n]), label=k, classname=n) for k, n in enumerate(names)]

    cache = EvalFeatureCache(tmp_path / "cache", "fp")
    feats, _ = cache.features(encode, samples("aab"))
    assert feats.flatten().tolist() == [0.0, 0.0, 1.0] and cache.encoded == 2
    feats, _ = cache.features(encode, samples("cdab"))
    assert feats.flatten().tolist() == [2.0, 3.0, 0.0, 1.0] and cache.encoded == 4
    reopened = EvalFeatureCache(tmp_path / "cache", "fp")  # the file on disk is consistent too
    feats, _ = reopened.features(encode, samples("dcba"))
    assert feats.flatten().tolist() == [3.0, 2.0, 1.0, 0.0] and reopened.encoded == 0
