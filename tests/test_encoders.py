"""Our encoders against open_clip: identical without prompts, and prompt placement checked by
running open_clip's own blocks on the hand-assembled token sequence."""
import pytest
import torch

from fastprompt.clip import TINY_MODEL, load_clip
from fastprompt.encoders import ImageEncoder, PromptAttention, TextEncoder


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def tiny():
    return load_clip(TINY_MODEL)


@pytest.fixture(scope="module")
def vit_b16():
    return load_clip("ViT-B-16")


@pytest.fixture(scope="module")
def vit_b16_quickgelu():
    # The architecture OpenAI's weights need: the encoders must carry its activation along.
    clip = load_clip("ViT-B-16-quickgelu")
    assert clip.activation == "quick_gelu"
    return clip


TEXTS = ["a photo of a dog.", "an aircraft", "x", "the quick brown fox jumps over the lazy dog, twice"]


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("which", ["tiny", "vit_b16", "vit_b16_quickgelu"])
def test_no_prompts_reproduces_open_clip(which, backend, request):
    clip = request.getfixturevalue(which)
    model = clip.model
    images = torch.randn(2, 3, clip.image_size, clip.image_size)
    tokens = clip.tokenizer(TEXTS)
    image_enc, text_enc = ImageEncoder(model, backend), TextEncoder(model, backend)
    with torch.no_grad():
        assert rel(image_enc(images), model.encode_image(images)) < 1e-5
        assert rel(text_enc(text_enc.embed(tokens), text_enc.pool_index(tokens)), model.encode_text(tokens)) < 1e-5


def test_encoders_share_open_clips_parameters(tiny):
    enc = ImageEncoder(tiny.model)
    ours = {id(p) for p in enc.parameters()}
    theirs = {id(p) for p in tiny.model.visual.parameters()}
    assert ours == theirs  # the same Parameter objects: no copy of the weights


def test_text_truncation_is_exact(tiny):
    enc = TextEncoder(tiny.model)
    tokens = tiny.tokenizer(TEXTS)
    with torch.no_grad():
        short = enc(enc.embed(tokens), enc.pool_index(tokens), truncate=True)
        full = enc(enc.embed(tokens), enc.pool_index(tokens), truncate=False)
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-6)


def _open_clip_image_with_prompts(visual, images, start, layer_prompts):
    """open_clip's own modules on [CLS, patches] with prompts inserted / replaced by hand."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], 1) + visual.positional_embedding
    n = layer_prompts[0].shape[0]
    p = layer_prompts[0].expand(x.shape[0], -1, -1)
    x = visual.ln_pre(torch.cat([x[:, :start], p, x[:, start:]], 1))
    for i, block in enumerate(visual.transformer.resblocks):
        if 0 < i < len(layer_prompts):
            p = layer_prompts[i].expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :start], p, x[:, start + n :]], 1)
        x = block(x)
    x = torch.cat([x[:, :start], x[:, start + n :]], 1)
    return visual.ln_post(x[:, 0]) @ visual.proj


@pytest.mark.parametrize("position", ["after_cls", "append"])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_image_prompts_placed_like_open_clip_blocks(tiny, position, backend):
    visual = tiny.model.visual
    enc = ImageEncoder(tiny.model, backend)
    start = enc.prompt_start(position)
    layer_prompts = [torch.randn(3, enc.width) for _ in range(2)]  # shallow + one deep layer
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = enc(images, prompts=layer_prompts[0], prompt_position=position, deep_prompts=[None, layer_prompts[1], None])
        theirs = _open_clip_image_with_prompts(visual, images, start, layer_prompts)
        plain = enc(images)
    assert rel(ours, theirs) < 1e-5
    assert rel(ours, plain) > 1e-3  # the prompts matter


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_text_deep_prompts_placed_like_open_clip_blocks(tiny, backend):
    model = tiny.model
    enc = TextEncoder(model, backend)
    tokens = tiny.tokenizer(["X X X dog.", "X X X golden retriever."])
    deep = torch.randn(3, enc.width)
    with torch.no_grad():
        ours = enc(enc.embed(tokens), enc.pool_index(tokens), prompt_start=1, num_prompts=3, deep_prompts=[None, deep, None])
        x = model.token_embedding(tokens) + model.positional_embedding
        for i, block in enumerate(model.transformer.resblocks):
            if i == 1:
                x = torch.cat([x[:, :1], deep.expand(2, -1, -1), x[:, 4:]], 1)
            x = block(x, attn_mask=model.attn_mask)
        x = model.ln_final(x)
        theirs = x[torch.arange(2), tokens.argmax(-1)] @ model.text_projection
    assert rel(ours, theirs) < 1e-5


def test_per_sample_prompts(tiny):
    enc = ImageEncoder(tiny.model)
    images = torch.randn(2, 3, 32, 32)
    prompts = torch.randn(2, 3, enc.width)
    with torch.no_grad():
        both = enc(images, prompts=prompts)
        for i in range(2):  # each sample with its own prompts
            torch.testing.assert_close(both[i : i + 1], enc(images[i : i + 1], prompts=prompts[i]), rtol=1e-5, atol=1e-6)


def test_language_conditioned_exact_layers_agree_across_backends(tiny):
    # sdpa runs these as standard attention under the language-conditioned mask, reference as the
    # decoupled op (other mixing rules take the reference op on both backends: nothing to compare).
    spec = PromptAttention(prompt_rows_see_all=True)
    tokens = tiny.tokenizer(["X X X X dog.", "X X X X cat"])
    outs = []
    for backend in ("reference", "sdpa"):
        enc = TextEncoder(tiny.model, backend)
        with torch.no_grad():
            outs.append(enc(enc.embed(tokens), enc.pool_index(tokens), prompt_start=1, num_prompts=4, attention=spec))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_language_conditioning_lets_prompts_read_the_class_name(tiny):
    enc = TextEncoder(tiny.model, "reference")
    a, b = tiny.tokenizer(["X X dog."]), tiny.tokenizer(["X X cat."])
    see_all = PromptAttention(prompt_rows_see_all=True)
    with torch.no_grad():
        # Only the prompt rows see the class name; measure the prompts' outputs at the last layer.
        feats = [enc(enc.embed(t), torch.tensor([2]), prompt_start=1, num_prompts=2, attention=see_all, truncate=False) for t in (a, b)]
        causal = [enc(enc.embed(t), torch.tensor([2]), prompt_start=1, num_prompts=2, truncate=False) for t in (a, b)]
    # Pooling token 2 (the last prompt): causal attention cannot see the class name, conditioned can.
    torch.testing.assert_close(causal[0], causal[1])
    assert rel(feats[0], feats[1]) > 1e-4


def test_bad_configurations(tiny):
    with pytest.raises(ValueError, match="attention_backend='flash' is not one of"):
        ImageEncoder(tiny.model, "flash")
    enc = ImageEncoder(tiny.model)
    with pytest.raises(ValueError, match="prompt_position='middle'"):
        enc(torch.randn(1, 3, 32, 32), prompts=torch.randn(2, enc.width), prompt_position="middle")
    with pytest.raises(ValueError, match="images must have shape"):
        enc(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="images must have shape \\[B, 3, 32, 32\\] for this model"):
        enc(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="float tensors normalised"):
        enc(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="deep_prompts must have one entry per layer"):
        enc(torch.randn(1, 3, 32, 32), prompts=torch.randn(2, enc.width), deep_prompts=[None])


def test_unsupported_tower_is_refused():
    rn = load_clip("RN50")
    with pytest.raises(ValueError, match="needs an open_clip VisionTransformer"):
        ImageEncoder(rn.model)
