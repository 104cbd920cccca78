"""The drop-in DecoupledAttention and swap_attention, on tiny random-init open_clip models.

Exact rules must reproduce the original model (fp32, ~1e-5); other rules must equal the same
model run through the reference op. Runs under the Triton interpreter on the CPU.
"""
from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from torch import nn

from fastprompt.kernels import DecoupledAttention, swap_attention
from fastprompt.kernels.attention_module import mask_is_causal

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tiny_clip() -> nn.Module:
    """A 2-layer vision + 2-layer text CLIP, random init (width 64, 4 heads of 16)."""
    vision = open_clip.model.CLIPVisionCfg(layers=2, width=64, head_width=16, patch_size=8, image_size=32)
    text = open_clip.model.CLIPTextCfg(context_length=16, vocab_size=100, width=64, heads=4, layers=2)
    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text)
    return model.to(DEVICE).eval()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _inputs():
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    tokens = torch.randint(1, 100, (3, 16), device=DEVICE)
    return images, tokens


def test_exact_swap_reproduces_open_clip():
    model = _tiny_clip()
    images, tokens = _inputs()
    with torch.no_grad():
        want_img, want_txt = model.encode_image(images), model.encode_text(tokens)
    swapped = copy.deepcopy(model)
    # Exact rules are standard attention at any prompt range: pretend tokens 1..4 are prompts.
    names = swap_attention(swapped, prompt_start=1, num_prompts=4)
    assert len(names) == 4 and all(isinstance(swapped.get_submodule(n), DecoupledAttention) for n in names)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in swapped.modules())
    with torch.no_grad():
        got_img, got_txt = swapped.encode_image(images), swapped.encode_text(tokens)
    assert _rel(got_img, want_img) < 1e-5
    assert _rel(got_txt, want_txt) < 1e-5  # the text tower's causal mask was recognised


def test_weights_are_shared_not_copied():
    model = _tiny_clip()
    mha = model.transformer.resblocks[0].attn
    swap_attention(model, prompt_start=0, num_prompts=0)
    swapped = model.transformer.resblocks[0].attn
    assert swapped.in_proj_weight is mha.in_proj_weight
    assert swapped.in_proj_bias is mha.in_proj_bias
    assert swapped.out_proj is mha.out_proj


def test_dpl_rules_match_the_reference_backend_forward_and_backward():
    """fixed instance rows, learned prompt rows, language-conditioned text prompts, fused vs reference."""
    model = _tiny_clip()
    images, tokens = _inputs()
    options = dict(prompt_start=1, num_prompts=4, prompt_rows_see_all=True, instance_mix="fixed",
                   instance_weight=0.2, prompt_mix="learned", prompt_weight=torch.randn(4))
    results = []
    for backend in ("triton", "sdpa", "reference"):
        m = copy.deepcopy(model)
        swap_attention(m, backend=backend, **options)
        feats = torch.cat([m.encode_image(images), m.encode_text(tokens)])
        (feats * torch.linspace(-1, 1, feats.numel(), device=DEVICE).view_as(feats)).sum().backward()
        theta_grads = torch.stack([mod.prompt_theta.grad for mod in m.modules() if isinstance(mod, DecoupledAttention)])
        results.append((feats.detach(), m.transformer.resblocks[0].attn.in_proj_weight.grad, theta_grads))
    (f_tri, g_tri, t_tri), (f_sdpa, g_sdpa, t_sdpa), (f_ref, g_ref, t_ref) = results
    for f, g, t in ((f_tri, g_tri, t_tri), (f_sdpa, g_sdpa, t_sdpa)):
        assert _rel(f, f_ref) < 2e-5
        assert _rel(g, g_ref) < 2e-5
        assert _rel(t, t_ref) < 1e-4 and t_ref.abs().max() > 0
    # The rules change the function: the exact model gives different features.
    with torch.no_grad():
        exact = torch.cat([model.encode_image(images), model.encode_text(tokens)])
    assert _rel(f_tri, exact) > 1e-3


def test_mask_recognition_and_refusal():
    n = 6
    additive = torch.full((n, n), float("-inf")).triu(1)
    assert mask_is_causal(additive, n)
    assert mask_is_causal(torch.ones(n, n, dtype=torch.bool).triu(1), n)
    assert not mask_is_causal(torch.zeros(n, n), n)
    assert not mask_is_causal(additive[:5, :5], n)
    mha = nn.MultiheadAttention(32, 2, batch_first=True).to(DEVICE)
    attn = DecoupledAttention(mha)
    x = torch.randn(2, n, 32, device=DEVICE)
    padding = torch.zeros(n, n, device=DEVICE)
    padding[:, -1] = float("-inf")
    with pytest.raises(ValueError, match="attn_mask"):
        attn(x, x, x, attn_mask=padding)
    with pytest.raises(ValueError, match="self-attention"):
        attn(x, x.clone(), x)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn(x, x, x, key_padding_mask=torch.zeros(2, n, dtype=torch.bool, device=DEVICE))
    causal = additive.to(DEVICE)
    want, _ = mha(x, x, x, need_weights=False, attn_mask=causal)
    got, weights = attn(x, x, x, need_weights=False, attn_mask=causal)
    assert weights is None and _rel(got, want) < 1e-5
    # The verified mask is remembered, but an in-place change is noticed.
    causal[:, -1] = float("-inf")
    with pytest.raises(ValueError, match="attn_mask"):
        attn(x, x, x, attn_mask=causal)


def test_unsupported_modules_are_refused_naming_the_layer_before_anything_is_swapped():
    with pytest.raises(ValueError, match="kdim/vdim"):
        DecoupledAttention(nn.MultiheadAttention(32, 2, batch_first=True, kdim=16, vdim=16))
    with pytest.raises(ValueError, match="dropout"):
        DecoupledAttention(nn.MultiheadAttention(32, 2, batch_first=True, dropout=0.1))
    with pytest.raises(ValueError, match="no nn.MultiheadAttention"):
        swap_attention(nn.Sequential(nn.Linear(4, 4)))
    # One bad layer: an error naming it, and the good layer is left as it was (decided up front).
    mixed = nn.ModuleDict({"a": nn.MultiheadAttention(32, 2, batch_first=True), "b": nn.MultiheadAttention(32, 2, dropout=0.1)})
    with pytest.raises(ValueError, match="^b: .*dropout"):
        swap_attention(mixed)
    assert isinstance(mixed["a"], nn.MultiheadAttention)
    # Both layouts are swapped, each keeping its own.
    both = nn.ModuleDict({"a": nn.MultiheadAttention(32, 2, batch_first=True), "b": nn.MultiheadAttention(32, 2)})
    assert swap_attention(both) == ["a", "b"]
    assert both["a"].batch_first and not both["b"].batch_first


def test_swapped_open_clip_block_compiles_fullgraph():
    """A text block with the causal mode fixed up front (no mask inspection): one graph, fwd + bwd."""
    torch._dynamo.reset()
    block = open_clip.transformer.ResidualAttentionBlock(64, 4).to(DEVICE)
    mask = torch.full((9, 9), float("-inf"), device=DEVICE).triu(1)
    x = torch.randn(2, 9, 64, device=DEVICE)
    with torch.no_grad():
        want = block(x, attn_mask=mask)
    swap_attention(block, prompt_start=1, num_prompts=3, prompt_rows_see_all=True, prompt_mix="learned",
                   instance_mix="fixed", instance_weight=0.1, causal=True)

    def step(fn):
        block.zero_grad()
        xx = x.clone().requires_grad_()
        y = fn(xx, attn_mask=mask)
        y.square().sum().backward()
        return y.detach(), xx.grad, block.attn.prompt_theta.grad

    eager = step(block)
    compiled = step(torch.compile(block, fullgraph=True))
    for g, w in zip(compiled, eager):
        assert _rel(g, w) < 1e-5
    assert _rel(eager[0], want) > 1e-3  # DPL's rules changed the block's function


# --- no copies, few launches: what the layer asks of the device, forward and backward ---------------

@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("rules", ["fixed/exact", "learned/detached"])
def test_layer_makes_no_layout_copy_and_three_launches(op_counts, batch_first, rules):
    """q, k, v are strided views of the projection; out is written in the caller's layout; d qkv in
    the projection's. Forward 1 kernel, backward 2 (+ one sum of the per-row d theta for `learned`)."""
    instance_mix, prompt_mix = rules.split("/")
    mha = nn.MultiheadAttention(32, 2, batch_first=batch_first)
    attn = DecoupledAttention(mha, prompt_start=1, num_prompts=3, instance_mix=instance_mix, prompt_mix=prompt_mix,
                              instance_weight=0.2 if instance_mix == "fixed" else None)
    x = torch.randn((2, 9, 32) if batch_first else (9, 2, 32), requires_grad=True)
    with op_counts as counts:
        y, _ = attn(x, x, x, need_weights=False)
        y.sum().backward()
    assert counts.copies() == {} and counts.syncs() == {}
    assert counts.launches == ["_forward_kernel", "_backward_dq_kernel", "_backward_dkdv_kernel"]
    compute = {k: v for k, v in counts.ops.items() if k in ("add", "mul", "sum", "fill_", "zero_", "zeros")}
    # Outside the kernels: the autograd seed's and the projections' backward sums, and d theta's one sum.
    assert compute.get("sum", 0) == 3 + (instance_mix == "learned") and set(compute) <= {"sum"}


def test_encoder_triton_block_makes_no_layout_copy(op_counts):
    """fastprompt's own encoder path (open_clip's batch-first block): the same, through the packed op."""
    from fastprompt.encoders import PromptAttention, _block_forward, attend

    block = open_clip.transformer.ResidualAttentionBlock(64, 4).to(DEVICE)
    spec = PromptAttention(instance_mix="fixed", instance_weight=0.1, prompt_rows_see_all=True)
    x = torch.randn(2, 9, 64, device=DEVICE, requires_grad=True)

    def attention(qkv):
        return attend(qkv, heads=4, backend="triton", causal=True, prompt_start=1, num_prompts=3, spec=spec)

    with op_counts as counts:
        _block_forward(block, x, attention).sum().backward()
    assert counts.copies() == {} and counts.syncs() == {}
    assert counts.launches == ["_forward_kernel", "_backward_dq_kernel", "_backward_dkdv_kernel"]
