"""The SDPA path of decoupled attention (no Triton) against the float64 reference: every rule pair,
every mask, every prompt position, forward and backward; and it never materialises the scores."""
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastprompt.kernels import reference
from fastprompt.kernels.decoupled_attention_sdpa import decoupled_attention_sdpa

RULES = ["exact", "fixed", "learned", "detached"]
MASKS = {"none": dict(causal=False), "causal": dict(causal=True),
         "causal+see_all": dict(causal=True, prompt_rows_see_all=True)}


def _weights(mix, h, dtype, seed):
    if mix == "fixed":
        return 0.3
    if mix == "learned":
        return torch.randn(h, dtype=dtype, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    return None


def _inputs(b, h, n, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, dtype=dtype, generator=g).requires_grad_() for _ in range(3)]


def _run(op, qkv, weights, **kwargs):
    out = op(*qkv, instance_weight=weights[0], prompt_weight=weights[1], **kwargs)
    grad = torch.randn_like(out, generator=torch.Generator().manual_seed(7)) if out.dtype != torch.bfloat16 \
        else torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    leaves = [*qkv] + [w for w in weights if isinstance(w, torch.Tensor)]
    grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)  # theta unused if no row mixes
    return out, [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("instance_mix,prompt_mix", list(itertools.product(RULES, RULES)))
@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("prompt_start,num_prompts,n", [(1, 4, 11), (0, 3, 9), (6, 3, 9), (2, 1, 5), (0, 5, 5)])
def test_matches_the_float64_reference(instance_mix, prompt_mix, mask, prompt_start, num_prompts, n):
    h = 2
    qkv = _inputs(2, h, n, 8)
    weights = (_weights(instance_mix, h, torch.float64, 1), _weights(prompt_mix, h, torch.float64, 2))
    kwargs = dict(prompt_start=prompt_start, num_prompts=num_prompts, instance_mix=instance_mix,
                  prompt_mix=prompt_mix, **MASKS[mask])
    ours, our_grads = _run(decoupled_attention_sdpa, qkv, weights, **kwargs)
    ref, ref_grads = _run(reference.decoupled_attention, qkv, weights, **kwargs)
    assert _rel(ours, ref) < 1e-12
    for a, b in zip(our_grads, ref_grads):
        assert _rel(a, b) < 1e-10


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rules", [("fixed", "exact"), ("learned", "detached"), ("exact", "exact")])
def test_low_precision_error_is_that_of_the_dtype(dtype, tol, rules):
    # DPL's default rules (instance fixed, prompt exact) on a ViT-like and a text-like layout.
    for n, ps, npr, mask in ((53, 1, 4, "none"), (29, 1, 8, "causal+see_all")):
        q64, k64, v64 = _inputs(2, 3, n, 16, seed=n)
        weights64 = (_weights(rules[0], 3, torch.float64, 1), _weights(rules[1], 3, torch.float64, 2))
        kwargs = dict(prompt_start=ps, num_prompts=npr, instance_mix=rules[0], prompt_mix=rules[1], **MASKS[mask])
        ref, _ = _run(reference.decoupled_attention, [q64, k64, v64], weights64, **kwargs)
        low = [t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64)]
        weights = tuple(w.detach().float().requires_grad_() if isinstance(w, torch.Tensor) else w for w in weights64)
        ours, _ = _run(decoupled_attention_sdpa, low, weights, **kwargs)
        assert ours.dtype == dtype and _rel(ours, ref) < tol


class _LargestTensor(TorchDispatchMode):
    """The largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("rules", [("fixed", "exact"), ("learned", "fixed"), ("fixed", "learned")])
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_never_materialises_the_score_matrix(rules, mask):
    b, h, n, d = 2, 2, 96, 16
    qkv = [t.detach().float().requires_grad_() for t in _inputs(b, h, n, d)]
    weights = (_weights(rules[0], h, torch.float32, 1), _weights(rules[1], h, torch.float32, 2))
    kwargs = dict(prompt_start=1, num_prompts=4, instance_mix=rules[0], prompt_mix=rules[1], **MASKS[mask])
    with _LargestTensor() as seen:
        _run(decoupled_attention_sdpa, qkv, weights, **kwargs)
    assert seen.largest < b * h * n * n // 4  # inputs and outputs are b*h*n*d; scores would be b*h*n*n
    with _LargestTensor() as eager:
        _run(reference.decoupled_attention, qkv, weights, **kwargs)
    assert eager.largest >= b * h * n * n  # the check can tell the two apart


def test_bad_arguments_raise_the_reference_errors():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="out of bounds"):
        decoupled_attention_sdpa(q, q, q, prompt_start=4, num_prompts=3)
    with pytest.raises(ValueError, match="instance_mix"):
        decoupled_attention_sdpa(q, q, q, prompt_start=0, num_prompts=1, instance_mix="soft")


@pytest.mark.parametrize("rules", [("fixed", "exact"), ("learned", "detached")])
def test_a_retained_graph_differentiates_twice(rules):
    """backward(retain_graph=True) then backward again (the attention table's backward-alone timing,
    or a user's double pass): the second pass rebuilds the consumed inner graph and gives the same
    gradients, equal to the float64 reference's."""
    qkv = _inputs(2, 3, 21, 8, seed=5)
    weights = [_weights(rules[0], 3, torch.float64, 1), _weights(rules[1], 3, torch.float64, 2)]
    kw = dict(prompt_start=1, num_prompts=4, causal=True, instance_mix=rules[0], prompt_mix=rules[1],
              instance_weight=weights[0], prompt_weight=weights[1])
    leaves = [*qkv] + [w for w in weights if isinstance(w, torch.Tensor)]
    out = decoupled_attention_sdpa(*qkv, **kw)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, leaves, dout, retain_graph=True)
    second = torch.autograd.grad(out, leaves, dout)
    ref = torch.autograd.grad(reference.decoupled_attention(*qkv, **kw), leaves, dout)
    for a, b, r in zip(first, second, ref):
        assert torch.equal(a, b)
        assert _rel(a, r) < 1e-12


def test_inside_a_checkpoint_the_region_is_recomputed_once():
    """Under torch.utils.checkpoint (how fastprompt encodes long class lists in chunks) the op's inner
    graph keeps its own tensors: backward recomputes the checkpointed region once, as for any op, and
    the gradients equal the float64 reference's."""
    from torch.utils.checkpoint import checkpoint

    qkv = _inputs(2, 3, 13, 8, seed=9)
    kw = dict(prompt_start=1, num_prompts=4, causal=True, prompt_rows_see_all=True, instance_mix="fixed",
              instance_weight=0.3)
    runs = []

    def region(q, k, v):
        runs.append(1)
        return decoupled_attention_sdpa(q.sin(), k, v, **kw).cos()

    out = checkpoint(region, *qkv, use_reentrant=False)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, qkv, dout)
    want = torch.autograd.grad(reference.decoupled_attention(qkv[0].sin(), *qkv[1:], **kw).cos(), qkv, dout)
    assert len(runs) == 2  # the forward, and one recomputation
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-12
