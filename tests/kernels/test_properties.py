"""Property-based tests (hypothesis): both fused kernels equal their float64 references over random
shapes, prompt ranges, masks, mixing rules, scales and CAT-head settings, at sizes the Triton
interpreter runs quickly (N <= 24, D in {16, 32}, B*H <= 4). Examples are derandomised, so CI sees
the same cases every run; fp32 tolerances as in test_decoupled_attention.py / test_cat_head.py.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastprompt.kernels  # noqa: F401  (registers the ops)
from fastprompt.kernels import cat_head as ch
from fastprompt.kernels import reference
from fastprompt.kernels.validation import triton_interpreter_enabled

fused_attention = sys.modules["fastprompt.kernels.decoupled_attention"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not triton_interpreter_enabled():
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

MIXES = ("exact", "fixed", "learned", "detached")
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float, atol: float, peer: float = 0.0) -> None:
    """Norm-wise closeness with the same -inf pattern and no NaN (as the kernel test files check).

    `peer`: PyTorch's own fp32 error on the same case; the kernel may be up to twice as far off.
    """
    got, want = got.detach().to("cpu", torch.float64), want.detach().to("cpu", torch.float64)
    assert got.shape == want.shape, f"{what}: {tuple(got.shape)} != {tuple(want.shape)}"
    assert not torch.isnan(got).any(), f"{what}: NaN"
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), f"{what}: -inf pattern differs"
    err = (got[finite] - want[finite]).norm().item()
    bound = max(rtol * want[finite].norm().item() + atol * math.sqrt(max(int(finite.sum()), 1)), 2 * peer)
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e}"


@st.composite
def attention_cases(draw):
    b, h = draw(st.sampled_from([(1, 1), (1, 2), (2, 1), (2, 2), (1, 4), (4, 1)]))
    n = draw(st.integers(1, 24))
    num_prompts = draw(st.integers(0, n))
    prompt_start = draw(st.integers(0, n - num_prompts))
    causal = draw(st.booleans())
    mixes = [draw(st.sampled_from(MIXES)) for _ in range(2)]
    weights = []
    for mix in mixes:
        if mix == "fixed":
            weights.append(draw(st.floats(0.0, 1.0)))
        elif mix == "learned":
            weights.append(torch.tensor(draw(st.lists(st.floats(-3, 3), min_size=h, max_size=h)), dtype=torch.float64))
        else:
            weights.append(None)
    return dict(
        shape=(b, h, n, draw(st.sampled_from([16, 32]))), seed=draw(st.integers(0, 2**31 - 1)),
        magnitude=draw(st.sampled_from([0.3, 1.0, 2.5])),
        kwargs=dict(prompt_start=prompt_start, num_prompts=num_prompts, causal=causal,
                    prompt_rows_see_all=causal and draw(st.booleans()), instance_mix=mixes[0], prompt_mix=mixes[1],
                    instance_weight=weights[0], prompt_weight=weights[1],
                    scale=draw(st.sampled_from([None, 0.1, 0.5]))),
    )


def _attention_run(op, q, k, v, dout, kwargs, dtype):
    leaves = [t.to(DEVICE, dtype).clone().requires_grad_() for t in (q, k, v)]
    kw = dict(kwargs)
    thetas = []
    for arg in ("instance_weight", "prompt_weight"):
        if isinstance(kw[arg], torch.Tensor):
            kw[arg] = kw[arg].to(DEVICE, dtype).clone().requires_grad_()
            thetas.append(kw[arg])
    out, lse_p, lse_x = op(*leaves, return_lse=True, **kw)
    (out.double() * dout.to(DEVICE)).sum().backward()
    return [out, lse_p, lse_x] + [t.grad for t in leaves] + [t.grad for t in thetas]


@PROPERTY
@given(case=attention_cases())
def test_decoupled_attention_equals_reference(case):
    g = torch.Generator().manual_seed(case["seed"])
    q, k, v, dout = (torch.randn(*case["shape"], generator=g, dtype=torch.float64) * case["magnitude"]
                     for _ in range(4))
    got = _attention_run(fused_attention.decoupled_attention, q, k, v, dout, case["kwargs"], torch.float32)
    want = _attention_run(reference.decoupled_attention, q, k, v, dout, case["kwargs"], torch.float64)
    assert len(got) == len(want)
    for name, a, b in zip(("out", "lse_p", "lse_x", "dq", "dk", "dv", "dtheta_1", "dtheta_2"), got, want):
        assert a is not None, f"{name}: no gradient"
        _close(a, b, name, rtol=2e-5, atol=1e-6)


@st.composite
def cat_head_cases(draw):
    return dict(b=draw(st.integers(1, 6)), c=draw(st.integers(2, 12)), d=draw(st.sampled_from([16, 32])),
                per_row_text=draw(st.booleans()), lam=draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])),
                scale=draw(st.sampled_from([1.0, 30.0, 100.0])), tensor_scale=draw(st.booleans()),
                fuse=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def _cat_inputs(case):
    g = torch.Generator().manual_seed(case["seed"])
    b, c, d = case["b"], case["c"], case["d"]

    def rand(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift

    tensors = {
        "image_features": rand(b, d, scale=0.5),
        "text_features": rand(b, c, d, scale=0.5) if case["per_row_text"] else rand(c, d, scale=0.5),
        "gamma_img": rand(d, scale=0.2, shift=1.0), "beta_img": rand(d, scale=0.1),
        "gamma_txt": rand(d, scale=0.2, shift=1.0), "beta_txt": rand(d, scale=0.1),
        "weight": rand(c, d, scale=1 / math.sqrt(d)), "bias": rand(c, scale=0.1),
    }
    labels = torch.randint(0, c, (b,), generator=g)
    return tensors, labels


@PROPERTY
@given(case=cat_head_cases())
def test_cat_head_loss_and_logits_equal_reference(case):
    tensors, labels = _cat_inputs(case)

    def run(loss_fn, logits_fn, dtype):
        leaves = {k: v.to(DEVICE, dtype).clone().requires_grad_() for k, v in tensors.items()}
        scale = torch.tensor(case["scale"], device=DEVICE, dtype=dtype) if case["tensor_scale"] else case["scale"]
        y = labels.to(DEVICE)
        loss = loss_fn(leaves["image_features"], leaves["text_features"], y, logit_scale=scale, lam=case["lam"],
                       **{k: leaves[k] for k in ("gamma_img", "beta_img", "gamma_txt", "beta_txt", "weight", "bias")})
        (1.7 * loss).backward()
        with torch.no_grad():
            logits = logits_fn(leaves["image_features"], leaves["text_features"], logit_scale=scale, lam=case["lam"],
                               fuse=case["fuse"], **{k: leaves[k] for k in ("gamma_img", "beta_img", "weight", "bias")})
        return loss, logits, {k: t.grad for k, t in leaves.items()}

    loss, logits, grads = run(ch.cat_head_loss, ch.cat_head_logits, torch.float32)
    ref_loss, ref_logits, ref_grads = run(reference.cat_head_loss, reference.cat_head_logits, torch.float64)
    # PyTorch in fp32 on the same case: where a softmax saturates, a gradient is a small difference
    # of O(1) numbers and no fp32 computation gets it to 1e-5 relative (the ml-cross-entropy rule).
    _, _, fp32_grads = run(reference.cat_head_loss, reference.cat_head_logits, torch.float32)
    # And the rounding of fp32 logits of size ~scale (an ulp each) reaches the gradients times scale.
    grad_atol = 8 * 2.0**-23 * case["scale"]
    assert loss.dtype == torch.float32 and logits.shape == (case["b"], case["c"])
    _close(loss, ref_loss, "loss", rtol=1e-5, atol=1e-6)
    _close(logits, ref_logits, "logits", rtol=1e-5, atol=1e-5)
    for name, want in ref_grads.items():
        assert grads[name] is not None and grads[name].shape == want.shape, name
        peer = (fp32_grads[name].double().cpu() - want.cpu()).norm().item()
        _close(grads[name], want, f"d{name}", rtol=1e-5, atol=grad_atol, peer=peer)
