"""The fused CAT head kernels against the float64 reference (fastprompt.kernels.reference).

Under TRITON_INTERPRET=1 (no GPU, set by tests/conftest.py) every kernel runs on the CPU; on a GPU
the same tests run natively, plus the `gpu`-marked large and low-precision cases.
Tolerances: fp32 within 1e-5 relative (norm-wise); fp16/bf16 by the rule "kernel error against the
fp64 truth no worse than PyTorch's error computing natively in that dtype, plus a margin".
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastprompt.kernels import cat_head as ch
from fastprompt.kernels import reference as ref
from fastprompt.kernels.validation import triton_interpreter_enabled

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not triton_interpreter_enabled():
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

GRAD_NAMES = ("image_features", "text_features", "gamma_img", "beta_img", "gamma_txt", "beta_txt", "weight", "bias")
PARAM_NAMES = GRAD_NAMES[2:]
SCALE = 100.0


def make_inputs(b, c, d, per_row_text, *, seed, dtype=torch.float32, param_dtype=None, device=DEVICE):
    """Fresh random inputs shaped like DePT's: raw CLIP features (not unit norm), gamma near 1."""
    g = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype

    def rand(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(device=device, dtype=dt)

    feats = {
        "image_features": rand(b, d, scale=0.5),
        "text_features": rand(b, c, d, scale=0.5) if per_row_text else rand(c, d, scale=0.5),
    }
    params = {
        "gamma_img": rand(d, scale=0.2, shift=1.0, dt=param_dtype),
        "beta_img": rand(d, scale=0.1, dt=param_dtype),
        "gamma_txt": rand(d, scale=0.2, shift=1.0, dt=param_dtype),
        "beta_txt": rand(d, scale=0.1, dt=param_dtype),
        "weight": rand(c, d, scale=1.0 / math.sqrt(d), dt=param_dtype),
        "bias": rand(c, scale=0.1, dt=param_dtype),
    }
    labels = torch.randint(0, c, (b,), generator=g).to(device)
    return feats, labels, params


def loss_and_grads(fn, feats, labels, params, *, lam, upstream=1.7, cast=None, logit_scale=SCALE):
    """Loss and the gradients of upstream * loss w.r.t. every differentiable input (fresh leaves)."""
    leaves = {k: (v.to(cast) if cast else v).detach().clone().requires_grad_() for k, v in {**feats, **params}.items()}
    loss = fn(
        leaves["image_features"], leaves["text_features"], labels,
        **{k: leaves[k] for k in PARAM_NAMES}, logit_scale=logit_scale, lam=lam,
    )
    (loss * upstream).backward()
    return loss.detach(), {k: leaves[k].grad for k in GRAD_NAMES}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; exact zeros must be matched exactly."""
    a, e = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(a).all(), "non-finite values in the kernel's output"
    denom = e.norm().item()
    if denom == 0.0:
        return a.norm().item()
    return (a - e).norm().item() / denom


def assert_matches_fp64(feats, labels, params, *, lam, tol=1e-5, logit_scale=SCALE):
    loss, grads = loss_and_grads(ch.cat_head_loss, feats, labels, params, lam=lam, logit_scale=logit_scale)
    ref_loss, ref_grads = loss_and_grads(ref.cat_head_loss, feats, labels, params, lam=lam, cast=torch.float64)
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref_loss) < tol
    for name in GRAD_NAMES:
        src = feats.get(name, params.get(name))
        assert grads[name].dtype == src.dtype and grads[name].shape == src.shape, name
        err = rel_err(grads[name], ref_grads[name])
        assert err < tol, f"d{name}: relative error {err:.2e}"


# A covering subset of C in {2, 5, 51, 500} x B in {1, 3, 64} x d in {32, 512} x both text shapes
# x lam in {0, 0.7, 1}: every value of each axis appears with both text shapes; the large
# C=500, d=512 case runs once per text shape.
CASES = [
    # (B, C, d, per_row_text, lam)
    (1, 2, 32, False, 0.7),
    (1, 5, 32, True, 0.0),
    (3, 5, 32, False, 1.0),
    (3, 2, 32, True, 0.7),
    (64, 51, 32, False, 0.0),
    (64, 51, 32, True, 1.0),
    (3, 51, 512, False, 0.7),
    (1, 51, 512, True, 0.7),
    (64, 500, 512, False, 0.7),
    (3, 500, 512, True, 0.7),
    (64, 2, 512, False, 1.0),
    (64, 5, 512, True, 0.0),
]


@pytest.mark.parametrize("b,c,d,per_row_text,lam", CASES)
def test_loss_and_gradients_match_fp64_reference(b, c, d, per_row_text, lam):
    feats, labels, params = make_inputs(b, c, d, per_row_text, seed=hash((b, c, d, per_row_text, lam)) % 2**31)
    assert_matches_fp64(feats, labels, params, lam=lam)


@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide tiles, 3 row splits, 2 class slices: several C tiles per slice, ragged tails in every
    dimension, split-K in the backward, log-sum-exp merging in the forward."""
    monkeypatch.setattr(ch, "FORCE_BLOCKS", ch.BlockSizes(16, 16, 16, splits=3, class_splits=2))


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every float buffer the op allocates starts as NaN, so an element it forgets to write shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.mark.parametrize("per_row_text", [False, True])
def test_many_tiles_and_row_splits(small_tiles, poisoned_allocations, per_row_text):
    feats, labels, params = make_inputs(37, 51, 48, per_row_text, seed=11 + per_row_text)
    # Repeated labels: the text gradient of one class gathers several rows.
    labels[:10] = labels[0]
    assert_matches_fp64(feats, labels, params, lam=0.7)


def test_scalar_tensor_scale_and_int32_labels_give_the_same_result():
    feats, labels, params = make_inputs(5, 7, 32, False, seed=3)
    loss, grads = loss_and_grads(ch.cat_head_loss, feats, labels, params, lam=0.7)
    scale_t = torch.tensor(SCALE, device=DEVICE)
    loss2, grads2 = loss_and_grads(ch.cat_head_loss, feats, labels.int(), params, lam=0.7, logit_scale=scale_t)
    assert torch.equal(loss, loss2)
    for name in GRAD_NAMES:
        assert torch.equal(grads[name], grads2[name]), name


def native_dtype_loss(image_features, text_features, labels, *, gamma_img, beta_img, gamma_txt, beta_txt,
                      weight, bias, logit_scale, lam):
    """The DePT loss computed by PyTorch in the inputs' own dtype (no upcast): the low-precision yardstick."""
    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    if txt.ndim == 3:
        z_itm = logit_scale * torch.einsum("bd,bcd->bc", img, txt)
        true_txt = text_features[torch.arange(labels.shape[0], device=labels.device), labels]
    else:
        z_itm = logit_scale * img @ txt.t()
        true_txt = text_features[labels]
    g = torch.cat([gamma_txt * true_txt + beta_txt, gamma_img * image_features + beta_img])
    z_cat = F.linear(g, weight, bias)
    return (1 - lam) * F.cross_entropy(z_itm, labels) + lam * F.cross_entropy(z_cat, torch.cat([labels, labels]))


# Slack on top of PyTorch's own same-dtype error (relative, norm-wise).
LOW_PRECISION_MARGIN = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}


def assert_low_precision_rule(feats, labels, params, *, lam, dtype):
    loss, grads = loss_and_grads(ch.cat_head_loss, feats, labels, params, lam=lam)
    truth_loss, truth = loss_and_grads(ref.cat_head_loss, feats, labels, params, lam=lam, cast=torch.float64)
    torch_loss, torch_grads = loss_and_grads(native_dtype_loss, feats, labels, params, lam=lam)
    margin = LOW_PRECISION_MARGIN[dtype]
    assert rel_err(loss, truth_loss) <= rel_err(torch_loss, truth_loss) + margin
    for name in GRAD_NAMES:
        assert grads[name].dtype == dtype
        k_err, t_err = rel_err(grads[name], truth[name]), rel_err(torch_grads[name], truth[name])
        assert k_err <= t_err + margin, f"d{name}: kernel {k_err:.2e} vs torch {dtype} {t_err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_row_text", [False, True])
def test_half_precision_inputs_meet_the_low_precision_rule(dtype, per_row_text):
    feats, labels, params = make_inputs(24, 37, 64, per_row_text, seed=5 + per_row_text, dtype=dtype)
    assert_low_precision_rule(feats, labels, params, lam=0.7, dtype=dtype)


def test_mixed_precision_fp32_head_on_bf16_features():
    """Under AMP the head's parameters stay fp32 while the encoders emit bf16: each grad keeps its dtype."""
    feats, labels, params = make_inputs(16, 19, 32, False, seed=8, dtype=torch.bfloat16, param_dtype=torch.float32)
    loss, grads = loss_and_grads(ch.cat_head_loss, feats, labels, params, lam=0.7)
    ref_loss, ref_grads = loss_and_grads(ref.cat_head_loss, feats, labels, params, lam=0.7, cast=torch.float64)
    assert rel_err(loss, ref_loss) < 1e-3
    for name in GRAD_NAMES:
        src = feats.get(name, params.get(name))
        assert grads[name].dtype == src.dtype
        assert rel_err(grads[name], ref_grads[name]) < 1e-2, name


LOGIT_CASES = [
    # (B, C, d, per_row_text, fuse, tensor_scale)
    (1, 2, 32, False, True, False),
    (3, 51, 32, True, True, True),
    (64, 5, 512, False, False, True),
    (37, 500, 32, False, True, True),
    (3, 51, 512, True, False, False),
]


@pytest.mark.parametrize("b,c,d,per_row_text,fuse,tensor_scale", LOGIT_CASES)
def test_inference_logits_match_fp64_reference(b, c, d, per_row_text, fuse, tensor_scale):
    feats, _, params = make_inputs(b, c, d, per_row_text, seed=hash((b, c, d, fuse)) % 2**31)
    scale = torch.tensor(SCALE, device=DEVICE) if tensor_scale else SCALE
    kw = {k: params[k] for k in ("gamma_img", "beta_img", "weight", "bias")}
    out = ch.cat_head_logits(feats["image_features"], feats["text_features"], **kw, logit_scale=scale, lam=0.7, fuse=fuse)
    expected = ref.cat_head_logits(
        feats["image_features"].double(), feats["text_features"].double(),
        **{k: v.double() for k, v in kw.items()}, logit_scale=SCALE, lam=0.7, fuse=fuse,
    )
    assert out.shape == (b, c) and out.dtype == torch.float32
    assert rel_err(out, expected) < 1e-5


def test_inference_logits_refuse_backward():
    feats, _, params = make_inputs(3, 5, 32, False, seed=2)
    w = params["weight"].clone().requires_grad_()
    out = ch.cat_head_logits(
        feats["image_features"], feats["text_features"], gamma_img=params["gamma_img"], beta_img=params["beta_img"],
        weight=w, bias=params["bias"], logit_scale=SCALE,
    )
    with pytest.raises(RuntimeError, match="inference kernel"):
        out.sum().backward()


# ---- errors: the same message as the reference ---------------------------------------------------


def _bad_labels_high(feats, labels, params):
    labels = labels.clone()
    labels[-1] = params["weight"].shape[0]
    return feats, labels, params


def _bad_labels_negative(feats, labels, params):
    labels = labels.clone()
    labels[0] = -1
    return feats, labels, params


def _nan_image(feats, labels, params):
    f = feats["image_features"].clone()
    f[1, 3] = float("nan")
    return {**feats, "image_features": f}, labels, params


def _inf_text(feats, labels, params):
    f = feats["text_features"].clone()
    f[2, 0] = float("inf")
    return {**feats, "text_features": f}, labels, params


def _mismatched_d(feats, labels, params):
    return {**feats, "text_features": feats["text_features"][:, :-1]}, labels, params


def _short_gamma(feats, labels, params):
    return feats, labels, {**params, "gamma_txt": params["gamma_txt"][:-2]}


def _lam_out_of_range(feats, labels, params):
    return feats, labels, params  # lam is set by the test


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (_bad_labels_high, r"labels must lie in \[0, 6\)"),
        (_bad_labels_negative, r"labels must lie in \[0, 6\)"),
        (_nan_image, "image_features contains NaN or inf"),
        (_inf_text, "text_features contains NaN or inf"),
        (_mismatched_d, "text_features must have shape"),
        (_short_gamma, r"gamma_txt must have shape \[32\]"),
    ],
)
def test_bad_arguments_raise_the_reference_error(monkeypatch, corrupt, match):
    """With the host-side value checks on (CHECK_VALUES, a debugging switch) the errors are the reference's."""
    monkeypatch.setattr(ch, "CHECK_VALUES", True)
    feats, labels, params = corrupt(*make_inputs(4, 6, 32, False, seed=4))
    for fn in (ref.cat_head_loss, ch.cat_head_loss):
        with pytest.raises(ValueError, match=match):
            fn(feats["image_features"], feats["text_features"], labels, **params, logit_scale=SCALE, lam=0.7)


def test_bad_scale_and_lam_raise(monkeypatch):
    feats, labels, params = make_inputs(4, 6, 32, False, seed=4)
    args = (feats["image_features"], feats["text_features"], labels)
    # A tensor scale is read on the device: by default a bad one makes the loss NaN (and fails a
    # device-side assertion on a GPU); the host-side check names it.
    assert torch.isnan(ch.cat_head_loss(*args, **params, logit_scale=torch.tensor(-1.0, device=DEVICE), lam=0.7))
    monkeypatch.setattr(ch, "CHECK_VALUES", True)
    with pytest.raises(ValueError, match="logit_scale must be the positive multiplier"):
        ch.cat_head_loss(*args, **params, logit_scale=torch.tensor(-1.0, device=DEVICE), lam=0.7)
    with pytest.raises(ValueError, match=r"lam must be a float in \[0, 1\]"):
        ch.cat_head_loss(*args, **params, logit_scale=SCALE, lam=1.5)


def test_float64_and_empty_batch_point_to_the_reference():
    feats, labels, params = make_inputs(4, 6, 32, False, seed=4, dtype=torch.float64)
    with pytest.raises(ValueError, match='head_backend="reference"'):
        ch.cat_head_loss(feats["image_features"], feats["text_features"], labels, **params, logit_scale=SCALE)
    feats, labels, params = make_inputs(4, 6, 32, False, seed=4)
    with pytest.raises(ValueError, match="no row"):
        ch.cat_head_loss(feats["image_features"][:0], feats["text_features"], labels[:0], **params, logit_scale=SCALE)


def test_cpu_tensors_without_the_interpreter_raise_a_clear_error(monkeypatch):
    # The setting is fixed when Triton is imported: pretend it was imported without the interpreter.
    from fastprompt.kernels import validation

    monkeypatch.setattr(validation, "_TRITON_INTERPRETED", False)
    feats, labels, params = make_inputs(4, 6, 32, False, seed=4, device="cpu")
    with pytest.raises(ValueError, match=r'need CUDA tensors.*head_backend="reference"'):
        ch.cat_head_loss(feats["image_features"], feats["text_features"], labels, **params, logit_scale=SCALE)
    kw = {k: params[k] for k in ("gamma_img", "beta_img", "weight", "bias")}
    with pytest.raises(ValueError, match="need CUDA tensors"):
        ch.cat_head_logits(feats["image_features"], feats["text_features"], **kw, logit_scale=SCALE)


# ---- torch.compile, custom-op contract, determinism -------------------------------------------------


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    feats, labels, params = make_inputs(6, 9, 32, False, seed=9)
    scale = torch.tensor(SCALE, device=DEVICE)

    def step(f_i, f_t, y, p):
        # Ops around the kernel, so the compiled graph is more than the custom op alone.
        loss = ch.cat_head_loss(f_i * 1.0, f_t, y, **p, logit_scale=scale, lam=0.7)
        return 2.0 * loss + (p["weight"] ** 2).sum() * 1e-3

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in {**feats, **params}.items()}
        out = fn(leaves["image_features"], leaves["text_features"], labels, {k: leaves[k] for k in PARAM_NAMES})
        out.backward()
        results.append((out.detach(), {k: leaves[k].grad for k in GRAD_NAMES}))
    (eager_out, eager_grads), (comp_out, comp_grads) = results
    torch.testing.assert_close(comp_out, eager_out, rtol=1e-6, atol=1e-6)
    for name in GRAD_NAMES:
        torch.testing.assert_close(comp_grads[name], eager_grads[name], rtol=1e-5, atol=1e-7, msg=name)

    logits = torch.compile(
        lambda f_i, f_t: ch.cat_head_logits(f_i, f_t, **{k: params[k] for k in ("gamma_img", "beta_img", "weight", "bias")},
                                            logit_scale=scale, lam=0.7),
        fullgraph=True,
    )(feats["image_features"], feats["text_features"])
    expected = ref.cat_head_logits(
        feats["image_features"], feats["text_features"],
        **{k: params[k] for k in ("gamma_img", "beta_img", "weight", "bias")}, logit_scale=SCALE, lam=0.7,
    )
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("per_row_text", [False, True])
def test_custom_op_contract_opcheck(per_row_text):
    """torch.library.opcheck: schema, fake (meta) kernel and autograd registration agree with the op."""
    feats, labels, params = make_inputs(5, 6, 32, per_row_text, seed=12)
    args = [feats["image_features"].requires_grad_(), feats["text_features"].requires_grad_(), labels]
    args += [params[k].requires_grad_() for k in PARAM_NAMES] + [None, SCALE, 0.7]
    torch.library.opcheck(torch.ops.fastprompt.cat_head_loss.default, args)
    kw_args = [feats["image_features"].detach(), feats["text_features"].detach()]
    kw_args += [params[k].detach() for k in ("gamma_img", "beta_img", "weight", "bias")] + [None, SCALE, 0.7, True]
    torch.library.opcheck(torch.ops.fastprompt.cat_head_logits.default, kw_args, test_utils=("test_schema", "test_faketensor"))


def test_backward_is_bitwise_deterministic(small_tiles):
    feats, labels, params = make_inputs(53, 40, 48, False, seed=13)
    labels[::3] = 7  # many rows scatter into one class's text gradient
    first = loss_and_grads(ch.cat_head_loss, feats, labels, params, lam=0.7)
    second = loss_and_grads(ch.cat_head_loss, feats, labels, params, lam=0.7)
    assert torch.equal(first[0], second[0])
    for name in GRAD_NAMES:
        assert torch.equal(first[1][name], second[1][name]), name


# ---- GPU only: natively, at the sizes DePT trains with ------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "b,c,d,per_row_text",
    [(4096, 500, 512, False), (256, 1000, 768, False), (1, 1000, 512, False), (33, 51, 512, True), (4, 1000, 768, True)],
)
def test_gpu_native_dtypes_meet_the_low_precision_rule(dtype, b, c, d, per_row_text):
    feats, labels, params = make_inputs(b, c, d, per_row_text, seed=hash((b, c, d)) % 2**31, dtype=dtype)
    assert_low_precision_rule(feats, labels, params, lam=0.7, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_logits_large(dtype):
    feats, _, params = make_inputs(1024, 1000, 768, False, seed=21, dtype=dtype)
    kw = {k: params[k] for k in ("gamma_img", "beta_img", "weight", "bias")}
    out = ch.cat_head_logits(feats["image_features"], feats["text_features"], **kw, logit_scale=SCALE)
    truth = ref.cat_head_logits(
        feats["image_features"].double(), feats["text_features"].double(),
        **{k: v.double() for k, v in kw.items()}, logit_scale=SCALE,
    )
    native = (0.3 * SCALE * F.normalize(feats["image_features"], dim=-1) @ F.normalize(feats["text_features"], dim=-1).t()
              + 0.7 * F.linear(kw["gamma_img"] * feats["image_features"] + kw["beta_img"], kw["weight"], kw["bias"]))
    assert rel_err(out, truth) <= rel_err(native, truth) + LOW_PRECISION_MARGIN[dtype]


@pytest.mark.gpu
def test_gpu_backward_is_bitwise_deterministic_with_default_splits():
    feats, labels, params = make_inputs(4096, 51, 512, False, seed=22, dtype=torch.bfloat16)
    first = loss_and_grads(ch.cat_head_loss, feats, labels, params, lam=0.7)
    second = loss_and_grads(ch.cat_head_loss, feats, labels, params, lam=0.7)
    for name in GRAD_NAMES:
        assert torch.equal(first[1][name], second[1][name]), name


# ---- the benchmark table's smoke mode, so CI exercises the script ----------------------------------


def test_benchmark_table_smoke_mode_writes_its_report(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "cat_head_table.py"
    spec = importlib.util.spec_from_file_location("cat_head_table_smoke", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = json.loads(module.main(["--smoke", "--out", str(tmp_path)]).read_text())
    assert {"device", "torch", "triton", "date", "peers", "rows"} <= set(report)
    assert {r["impl"] for r in report["rows"]} >= {"triton", "eager"}
    assert {(r["B"], r["C"]) for r in report["rows"]} == set(module.SMOKE_SHAPES)
    for row in report["rows"]:
        assert all(row[f"{m}_ms"] > 0 for m in module.MODES), row


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter meets the NaN
def test_value_checks_without_a_host_sync(monkeypatch):
    """By default (CHECK_VALUES False) nothing is read back to the host: a label outside [0, C) never
    indexes memory and makes the loss NaN (on a GPU it also fails a device-side assertion, as
    PyTorch's cross_entropy does); NaN features give a NaN loss. Shape checks always run; with
    CHECK_VALUES the reference's ValueErrors name the problem."""
    assert ch.CHECK_VALUES is False
    feats, labels, params = make_inputs(4, 6, 32, False, seed=4)
    for bad in (6, -1, 10**6):
        wrong = labels.clone()
        wrong[1] = bad
        assert torch.isnan(ch.cat_head_loss(feats["image_features"], feats["text_features"], wrong, **params,
                                            logit_scale=SCALE))
    nan_feats = feats["image_features"].clone()
    nan_feats[0, 0] = float("nan")
    args = (nan_feats, feats["text_features"], labels)
    assert torch.isnan(ch.cat_head_loss(*args, **params, logit_scale=SCALE))
    with pytest.raises(ValueError, match="text_features must have shape"):
        ch.cat_head_loss(args[0], args[1][:, :-1], labels, **params, logit_scale=SCALE)
    monkeypatch.setattr(ch, "CHECK_VALUES", True)
    with pytest.raises(ValueError, match="image_features contains NaN or inf"):
        ch.cat_head_loss(*args, **params, logit_scale=SCALE)


@pytest.mark.parametrize("splits", [1, 3])
def test_loss_forward_and_backward_is_five_launches(op_counts, monkeypatch, splits):
    """Forward: the sliced kernel and the merge (which sums the loss); backward: three kernels, the
    split-K reduction finished inside the class kernel. No other device work, no host sync."""
    monkeypatch.setattr(ch, "FORCE_BLOCKS", ch.BlockSizes(16, 16, 16, splits=splits, class_splits=2))
    feats, labels, params = make_inputs(64, 51, 32, False, seed=8)
    leaves = {k: v.clone().requires_grad_() for k, v in {**feats, **params}.items()}
    scale = torch.tensor(SCALE, device=DEVICE)  # read by the kernels from the device
    with op_counts as counts:
        loss = ch.cat_head_loss(leaves["image_features"], leaves["text_features"], labels,
                                **{k: leaves[k] for k in PARAM_NAMES}, logit_scale=scale, lam=0.7)
        loss.backward()
    assert counts.launches == ["_loss_fwd_kernel", "_lse_merge_kernel", "_logit_grad_kernel", "_row_grad_kernel",
                               "_class_grad_kernel"]
    device_work = {k for k in counts.ops if not k.startswith("fastprompt::")} - {
        "empty", "empty_like", "detach", "reshape", "view", "to", "ones_like"}  # ones_like: backward()'s seed
    assert device_work == set() and counts.syncs() == {}
    ref_loss, ref_grads = loss_and_grads(ref.cat_head_loss, feats, labels, params, lam=0.7, upstream=1.0,
                                         cast=torch.float64)
    assert rel_err(loss, ref_loss) < 1e-5
    for name in GRAD_NAMES:
        assert rel_err(leaves[name].grad, ref_grads[name]) < 1e-5, name


@pytest.mark.gpu
def test_gpu_cpu_scalar_logit_scale_with_cuda_features():
    """A CPU scalar temperature (e.g. torch.tensor(100.)) is moved to the features, as the reference does."""
    feats, labels, params = make_inputs(8, 5, 32, False, seed=23)
    cpu_scale = torch.tensor(SCALE)
    fused = ch.cat_head_loss(**feats, labels=labels, **params, logit_scale=cpu_scale)
    truth = ref.cat_head_loss(**feats, labels=labels, **params, logit_scale=cpu_scale)
    torch.testing.assert_close(fused, truth.float(), rtol=1e-5, atol=1e-6)


# ---- the drop-in call for DePT-style research code --------------------------------------------------

class _ScaleShift(torch.nn.Module):
    """A channel-wise scale and shift layer as DePT-style codebases write it (`scale`, `bias` [d])."""

    def __init__(self, d):
        super().__init__()
        self.scale = torch.nn.Parameter(1.0 + 0.2 * torch.randn(d))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        return self.scale.to(x.dtype) * x + self.bias.to(x.dtype)


@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_one_call_replaces_the_research_codes_head_lines(lam):
    """lam = 1: linear(cat([film_txt(f_T)[y], film_img(f_I)])) + cross-entropy with [y; y], one for one
    (forward and every gradient); lam < 1: the whole objective, ITM cross-entropy included."""
    b, c, d = 6, 11, 32
    torch.manual_seed(5)
    film_img, film_txt, linear = _ScaleShift(d), _ScaleShift(d), torch.nn.Linear(d, c)
    img = (0.5 * torch.randn(b, d)).requires_grad_()
    txt = (0.5 * torch.randn(c, d)).requires_grad_()
    labels = torch.randint(0, c, (b,))
    logit_scale = torch.tensor(100.0)
    modules = [film_img, film_txt, linear]

    def research_lines():
        t, i = film_txt(txt.double()), film_img(img.double())
        logits = torch.nn.functional.linear(torch.cat([t[labels], i]), linear.weight.double(), linear.bias.double())
        loss_cat = F.cross_entropy(logits, torch.cat([labels, labels]))
        if lam == 1.0:
            return loss_cat
        # The ITM logits on the raw features (before the scale/shift layers), as DePT computes them.
        sim = logit_scale.double() * F.normalize(img.double(), dim=-1) @ F.normalize(txt.double(), dim=-1).t()
        return (1 - lam) * F.cross_entropy(sim, labels) + lam * loss_cat

    def one_call():
        return ch.cat_head_loss(img.to(DEVICE), txt.to(DEVICE), labels.to(DEVICE),
                                gamma_img=film_img.scale, beta_img=film_img.bias, gamma_txt=film_txt.scale,
                                beta_txt=film_txt.bias, weight=linear.weight, bias=linear.bias,
                                logit_scale=1.0 if lam == 1.0 else logit_scale, lam=lam)

    results = []
    for fn in (research_lines, one_call):
        for t in [img, txt, *[p for m in modules for p in m.parameters()]]:
            t.grad = None
        loss = fn()
        loss.backward()
        results.append((loss.detach(), [t.grad.clone() for t in [img, txt, *[p for m in modules for p in m.parameters()]]]))
    (want, want_grads), (got, got_grads) = results
    assert rel_err(got, want) < 1e-5
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert rel_err(g, w) < 1e-5, i
