"""swap_attention on a CLIP built the way the research codebases vendor OpenAI's `clip/model.py`.

The model below is written here from that architecture's description (not copied): sequence-first
[N, B, E] residual blocks holding `nn.MultiheadAttention(batch_first=False)`, called as
`attn(x, x, x, need_weights=False, attn_mask=self.attn_mask)[0]`, QuickGELU MLPs, an additive
causal mask registered as a buffer of the text blocks, and MaPLe-style prompts: token embeddings
at positions 1..n_ctx of the text and visual prompts appended after the patches, replaced
between blocks by the next layer's deep prompts. Tiny sizes (width 128, heads of 64 like OpenAI's),
random init, fp32, under the Triton interpreter on the CPU.
"""
from __future__ import annotations

import copy
import math
import sys
from collections import OrderedDict

import open_clip
import pytest
import torch
from torch import nn

from fastprompt.encoders import ImageEncoder, PromptAttention, TextEncoder
from fastprompt.kernels import DecoupledAttention, swap_attention

fused = sys.modules["fastprompt.kernels.decoupled_attention"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WIDTH, LAYERS, CONTEXT, VOCAB, IMAGE, PATCH, EMBED = 128, 2, 16, 100, 32, 8, 64
N_CTX, N_VIS = 2, 2
PATCHES = (IMAGE // PATCH) ** 2


class LayerNorm(nn.LayerNorm):
    """Computes in fp32 whatever the input dtype (OpenAI's fp16-safe LayerNorm)."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, attn_mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)  # sequence-first
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = LayerNorm(width)
        if attn_mask is None:
            self.attn_mask = None
        else:
            self.register_buffer("attn_mask", attn_mask, persistent=False)

    def attention(self, x):
        mask = self.attn_mask.to(dtype=x.dtype, device=x.device) if self.attn_mask is not None else None
        return self.attn(x, x, x, need_weights=False, attn_mask=mask)[0]

    def forward(self, x):
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """Blocks over [N, B, W]; MaPLe-style: before block i >= 1, tokens [start, start + n) are
    replaced by deep_prompts[i - 1] ([n, W], shared by the batch)."""

    def __init__(self, width: int, layers: int, heads: int, attn_mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x, deep_prompts=(), prompt_start=0):
        for i, block in enumerate(self.resblocks):
            if i >= 1 and i - 1 < len(deep_prompts):
                ctx = deep_prompts[i - 1]
                ctx = ctx.to(x.dtype).unsqueeze(1).expand(-1, x.shape[1], -1)
                x = torch.cat([x[:prompt_start], ctx, x[prompt_start + ctx.shape[0]:]], dim=0)
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        scale = WIDTH ** -0.5
        self.conv1 = nn.Conv2d(3, WIDTH, PATCH, PATCH, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(WIDTH))
        self.positional_embedding = nn.Parameter(scale * torch.randn(PATCHES + 1, WIDTH))
        self.ln_pre = LayerNorm(WIDTH)
        self.transformer = Transformer(WIDTH, LAYERS, WIDTH // 64)
        self.ln_post = LayerNorm(WIDTH)
        self.proj = nn.Parameter(scale * torch.randn(WIDTH, EMBED))

    def forward(self, images, prompts=None, deep_prompts=()):
        x = self.conv1(images).flatten(2).permute(0, 2, 1)  # [B, patches, W]
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, WIDTH, dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        if prompts is not None:  # MaPLe: appended after the patches, before ln_pre
            x = torch.cat([x, prompts.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        x = self.ln_pre(x).permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x, deep_prompts, prompt_start=1 + PATCHES).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class OpenAIStyleCLIP(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = VisionTransformer()
        self.transformer = Transformer(WIDTH, LAYERS, WIDTH // 64, attn_mask=self.build_attention_mask())
        self.token_embedding = nn.Embedding(VOCAB, WIDTH)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(CONTEXT, WIDTH))
        self.ln_final = LayerNorm(WIDTH)
        self.text_projection = nn.Parameter(WIDTH ** -0.5 * torch.randn(WIDTH, EMBED))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    @staticmethod
    def build_attention_mask():
        return torch.full((CONTEXT, CONTEXT), float("-inf")).triu_(1)  # additive: -inf above the diagonal

    def encode_image(self, images, prompts=None, deep_prompts=()):
        return self.visual(images, prompts, deep_prompts)

    def encode_text(self, text, prompts=None, deep_prompts=()):
        x = self.token_embedding(text)
        if prompts is not None:  # CoOp/MaPLe: context vectors at positions 1..n_ctx
            x = torch.cat([x[:, :1], prompts.expand(x.shape[0], -1, -1), x[:, 1 + prompts.shape[0]:]], dim=1)
        x = (x + self.positional_embedding).permute(1, 0, 2)
        x = self.transformer(x, deep_prompts, prompt_start=1).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)] @ self.text_projection


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(7)
    return OpenAIStyleCLIP().to(DEVICE).eval()


def _inputs():
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=g)
    text = torch.randint(1, VOCAB - 1, (3, CONTEXT), generator=g)
    text[:, 9] = VOCAB - 1  # the end-of-text token (the argmax) at position 9
    text[:, 10:] = 0
    prompts = {
        "text": torch.randn(N_CTX, WIDTH, generator=g) * 0.02,
        "text_deep": [torch.randn(N_CTX, WIDTH, generator=g) * 0.02 for _ in range(LAYERS - 1)],
        "vision": torch.randn(N_VIS, WIDTH, generator=g) * 0.02,
        "vision_deep": [torch.randn(N_VIS, WIDTH, generator=g) * 0.02 for _ in range(LAYERS - 1)],
    }
    prompts = {k: [t.to(DEVICE) for t in v] if isinstance(v, list) else v.to(DEVICE) for k, v in prompts.items()}
    return images.to(DEVICE), text.to(DEVICE), prompts


def _features_and_grads(model, images, text, prompts):
    """Both towers' features and the gradients of a fixed functional w.r.t. every prompt and one weight."""
    leaves = {k: ([t.clone().requires_grad_() for t in v] if isinstance(v, list) else v.clone().requires_grad_())
              for k, v in prompts.items()}
    img = model.encode_image(images, leaves["vision"], leaves["vision_deep"])
    txt = model.encode_text(text, leaves["text"], leaves["text_deep"])
    feats = torch.cat([img.flatten(), txt.flatten()])
    model.zero_grad()
    (feats * torch.linspace(-1, 1, feats.numel(), device=feats.device)).sum().backward()
    grads = [leaves["vision"].grad, *[t.grad for t in leaves["vision_deep"]], leaves["text"].grad,
             *[t.grad for t in leaves["text_deep"]], model.transformer.resblocks[0].attn.in_proj_weight.grad,
             model.visual.transformer.resblocks[1].attn.in_proj_weight.grad]
    return feats.detach(), grads


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _swap(model, **rules):
    """Both towers, each with its prompt range (text after SOS, vision appended after the patches)."""
    names = swap_attention(model.transformer, prompt_start=1, num_prompts=N_CTX, **rules)
    names += swap_attention(model.visual, prompt_start=1 + PATCHES, num_prompts=N_VIS, **rules)
    return names


@pytest.mark.parametrize("dispatch", [True, False], ids=["sdpa_dispatch", "fused_kernel"])
@pytest.mark.parametrize("rules", [
    dict(),  # exact/exact: standard attention at any prompt range
    dict(backend="sdpa"),  # the module's fused-SDPA path, same layouts
    dict(backend="reference"),  # the module's plain-PyTorch path, same layouts
], ids=["triton", "sdpa", "reference"])
def test_exact_rules_reproduce_the_unswapped_model(base_model, monkeypatch, dispatch, rules):
    """Image and text towers, forward and backward (prompts, deep prompts, projection weights)."""
    monkeypatch.setattr(fused, "DISPATCH_TO_SDPA", dispatch)
    images, text, prompts = _inputs()
    want_feats, want_grads = _features_and_grads(base_model, images, text, prompts)
    swapped = copy.deepcopy(base_model)
    names = _swap(swapped, **rules)
    assert len(names) == 2 * LAYERS and not any(isinstance(m, nn.MultiheadAttention) for m in swapped.modules())
    assert all(not swapped.get_submodule(f"transformer.{n}").batch_first for n in names[:LAYERS])
    feats, grads = _features_and_grads(swapped, images, text, prompts)
    assert _rel(feats, want_feats) < 2e-5
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert _rel(g, w) < 5e-5, i


@pytest.mark.parametrize("mix", ["fixed", "learned", "detached"])
def test_every_rule_reduces_to_the_unswapped_model_in_its_exact_case(base_model, mix):
    """No prompt tokens: every rule is standard attention (fixed dispatches to SDPA, learned runs the
    split kernel); detached with prompts computes standard attention's values (its gradient differs)."""
    images, text, prompts = _inputs()
    weight = 0.3 if mix == "fixed" else None
    want = torch.cat([base_model.encode_image(images).flatten(), base_model.encode_text(text).flatten()])
    no_prompts = copy.deepcopy(base_model)
    swap_attention(no_prompts, prompt_start=0, num_prompts=0, instance_mix=mix, prompt_mix=mix,
                   instance_weight=weight, prompt_weight=weight)
    img = no_prompts.encode_image(images)
    txt = no_prompts.encode_text(text)
    (img.sum() + txt.sum()).backward()
    assert _rel(torch.cat([img.flatten(), txt.flatten()]).detach(), want.detach()) < 2e-5
    base_model.zero_grad()
    (base_model.encode_image(images).sum() + base_model.encode_text(text).sum()).backward()
    got_w = no_prompts.transformer.resblocks[0].attn.in_proj_weight.grad
    assert _rel(got_w, base_model.transformer.resblocks[0].attn.in_proj_weight.grad) < 5e-5
    if mix == "detached":
        with_prompts = copy.deepcopy(base_model)
        _swap(with_prompts, instance_mix="detached", prompt_mix="detached")
        want_feats, _ = _features_and_grads(base_model, images, text, prompts)
        feats, _ = _features_and_grads(with_prompts, images, text, prompts)
        assert _rel(feats, want_feats) < 2e-5


def test_every_calling_convention_of_the_blocks(base_model):
    """Keyword or positional need_weights, float (any dtype) or bool causal mask, key_padding_mask=None,
    the default need_weights=True: each gives the unswapped module's output, and weights None."""
    mha = copy.deepcopy(base_model.transformer.resblocks[0].attn)
    attn = DecoupledAttention(copy.deepcopy(mha), name="text.0.attn")
    x = torch.randn(CONTEXT, 3, WIDTH, device=DEVICE)  # [N, B, E]
    additive = OpenAIStyleCLIP.build_attention_mask().to(DEVICE)
    boolean = torch.ones(CONTEXT, CONTEXT, dtype=torch.bool, device=DEVICE).triu(1)
    want, _ = mha(x, x, x, need_weights=False, attn_mask=additive)
    calls = [
        lambda: attn(x, x, x, need_weights=False, attn_mask=additive),
        lambda: attn(x, x, x, None, False, additive),
        lambda: attn(x, x, x, key_padding_mask=None, need_weights=False, attn_mask=boolean),
        lambda: attn(x, x, x, attn_mask=additive.half()),  # the mask in another dtype; need_weights default
        lambda: attn(x, x, x, need_weights=False, attn_mask=None, is_causal=True),
    ]
    for i, call in enumerate(calls):
        out, weights = call()
        assert weights is None and out.shape == x.shape
        assert _rel(out, want) < 1e-5, i
    no_mask, _ = mha(x, x, x, need_weights=False)
    assert _rel(attn(x, x, x, need_weights=False)[0], no_mask) < 1e-5


def test_what_the_kernel_cannot_compute_is_refused_naming_the_layer(base_model):
    model = copy.deepcopy(base_model)
    # A block that keeps a mask other than the causal one: refused when swapping, nothing replaced.
    padding = torch.zeros(CONTEXT, CONTEXT, device=DEVICE)
    padding[:, -3:] = float("-inf")
    model.transformer.resblocks[1].attn_mask = padding
    with pytest.raises(ValueError, match=r"^resblocks\.1\.attn: .*not the causal mask"):
        swap_attention(model.transformer, prompt_start=1, num_prompts=N_CTX)
    assert isinstance(model.transformer.resblocks[0].attn, nn.MultiheadAttention)
    # Dropout: refused when swapping.
    model.visual.transformer.resblocks[0].attn.dropout = 0.1
    with pytest.raises(ValueError, match=r"^transformer\.resblocks\.0\.attn: .*dropout"):
        swap_attention(model.visual)
    # A padding mask at call time: refused, naming the layer.
    names = swap_attention(model.visual.transformer.resblocks[1])
    attn = model.visual.transformer.resblocks[1].attn
    x = torch.randn(5, 2, WIDTH, device=DEVICE)
    with pytest.raises(ValueError, match=r"^attn: key_padding_mask"):
        attn(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool, device=DEVICE))
    assert names == ["attn"]


def _open_clip_twin(model: OpenAIStyleCLIP):
    """open_clip's CLIP with the same weights (OpenAI's parameter names, QuickGELU)."""
    vision = open_clip.model.CLIPVisionCfg(layers=LAYERS, width=WIDTH, head_width=64, patch_size=PATCH,
                                           image_size=IMAGE)
    text = open_clip.model.CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=WIDTH, heads=WIDTH // 64,
                                       layers=LAYERS)
    twin = open_clip.model.CLIP(embed_dim=EMBED, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin.to(DEVICE).eval()


def test_dpl_rules_equal_fastprompts_own_encoders(base_model):
    """DPL's default rules (instance rows fixed at 0.1, prompt rows exact, text prompt rows reading the
    whole text): the swapped sequence-first model equals fastprompt's encoders over the same weights
    and prompts (reference backend), forward and backward."""
    images, text, prompts = _inputs()
    rules = dict(instance_mix="fixed", instance_weight=0.1, prompt_mix="exact")
    swapped = copy.deepcopy(base_model)
    swap_attention(swapped.transformer, prompt_start=1, num_prompts=N_CTX, prompt_rows_see_all=True, **rules)
    swap_attention(swapped.visual, prompt_start=1 + PATCHES, num_prompts=N_VIS, **rules)
    feats, grads = _features_and_grads(swapped, images, text, prompts)

    twin = _open_clip_twin(base_model)
    image_enc, text_enc = ImageEncoder(twin, "reference"), TextEncoder(twin, "reference")
    spec = PromptAttention(prompt_rows_see_all=True, **rules)
    leaves = {k: ([t.clone().requires_grad_() for t in v] if isinstance(v, list) else v.clone().requires_grad_())
              for k, v in prompts.items()}
    img = image_enc(images, prompts=leaves["vision"], prompt_position="append",
                    deep_prompts=[None, *leaves["vision_deep"]], attention=spec)
    embeddings = text_enc.embed(text)
    embeddings = torch.cat([embeddings[:, :1], leaves["text"].expand(text.shape[0], -1, -1),
                            embeddings[:, 1 + N_CTX:]], dim=1)
    txt = text_enc(embeddings, text.argmax(dim=-1), prompt_start=1, num_prompts=N_CTX,
                   deep_prompts=[None, *leaves["text_deep"]], attention=spec, truncate=False)
    want = torch.cat([img.flatten(), txt.flatten()])
    (want * torch.linspace(-1, 1, want.numel(), device=want.device)).sum().backward()
    want_grads = [leaves["vision"].grad, *[t.grad for t in leaves["vision_deep"]], leaves["text"].grad,
                  *[t.grad for t in leaves["text_deep"]]]
    assert _rel(feats, want.detach()) < 2e-5
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert _rel(g, w) < 5e-5, i
    # And the rules changed the function: the exact model differs.
    exact, _ = _features_and_grads(base_model, images, text, prompts)
    assert _rel(feats, exact) > 1e-3
