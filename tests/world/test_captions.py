"""Captions: the right words, the right positives, and the token rows pretraining trains."""
import open_clip
import torch

import fastprompt.clip  # noqa: F401  (registers the fastprompt-world config)
from fastprompt.world.captions import (ATTRIBUTES, FILLER_WORDS, FULL_TEMPLATES, MAX_FILLER, TEMPLATES, CaptionTable,
                                       named_attributes, positives)
from fastprompt.world.vocabulary import NUM_COLOURS, NUM_SHAPES, class_name

TOKENIZER = open_clip.get_tokenizer("fastprompt-world")


def _text(tokens: torch.Tensor) -> str:
    from open_clip.tokenizer import _tokenizer

    return _tokenizer.decode([t for t in tokens.tolist() if t not in (0, 49406, 49407)]).strip()


def test_the_first_template_is_the_zero_shot_prompt():
    table = CaptionTable.build(TOKENIZER)
    assert FULL_TEMPLATES[0] == "a photo of a {colour} {shape}."
    assert torch.equal(table.tokens[0, 0, 4, 1, 0], TOKENIZER(["a photo of a red star."])[0])
    assert _text(table.tokens[TEMPLATES.index("a {size} {colour} {shape} on a {background} background."), 7, 7, 1, 0]) \
        == "a large pink heart on a dark background ."


def test_sampled_captions_describe_their_images():
    table = CaptionTable.build(TOKENIZER)
    g = torch.Generator().manual_seed(1)
    attrs = torch.stack([torch.randint(8, (500,), generator=g), torch.randint(8, (500,), generator=g),
                         torch.randint(2, (500,), generator=g), torch.randint(2, (500,), generator=g)], 1)
    tokens, constraints = table.sample(attrs, g)
    named = constraints >= 0
    assert torch.equal(constraints[named], attrs[named])
    assert 0.25 < float((~named[:, 0] | ~named[:, 1]).float().mean()) < 0.45  # partial captions: about a third
    texts = [_text(t) for t in tokens]
    for i in range(20):  # the words of the named attributes are in the caption's text
        text = texts[i]
        words = {"colour": ["red", "orange", "yellow", "green", "turquoise", "blue", "purple", "pink"],
                 "shape": ["circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart"],
                 "size": ["small", "large"], "background": ["dark", "light"]}
        for a, name in enumerate(ATTRIBUTES):
            if named[i, a]:
                assert words[name][int(attrs[i, a])] in text.split(), (text, name)


def test_filler_words_lead_half_the_captions_and_leave_the_rest_intact():
    table = CaptionTable.build(TOKENIZER)
    g = torch.Generator().manual_seed(3)
    original = table.tokens.flatten(0, -2)[torch.randint(table.tokens[..., 0].numel(), (2000,), generator=g)]
    out = table._with_filler(original, g)
    eot = 49407
    k = (out == eot).int().argmax(1) - (original == eot).int().argmax(1)  # how far the caption moved
    assert int(k.min()) == 0 and int(k.max()) == MAX_FILLER and 0.4 < float((k > 0).float().mean()) < 0.6
    filler = set(TOKENIZER(list(FILLER_WORDS))[:, 1].tolist())
    for row, src, n in zip(out, original, k.tolist()):
        assert row[0] == src[0] and set(row[1:n + 1].tolist()) <= filler
        assert torch.equal(row[n + 1:], src[1:len(src) - n])


def test_positives_match_a_brute_force_check():
    g = torch.Generator().manual_seed(2)
    attrs = torch.randint(2, (40, 4), generator=g)
    constraints = torch.where(torch.rand(40, 4, generator=g) < 0.5, torch.randint(2, (40, 4), generator=g), -1)
    expected = torch.tensor([[all(c == -1 or c == a for a, c in zip(attrs[i].tolist(), constraints[j].tolist()))
                              for j in range(40)] for i in range(40)])
    assert torch.equal(positives(attrs, constraints), expected)


def test_named_attributes_and_vocabulary():
    assert named_attributes("a {size} {shape}.") == (False, True, True, False)
    ids = set(CaptionTable.build(TOKENIZER).vocabulary().tolist())
    prompts = TOKENIZER([f"a photo of a {class_name(c, s)}." for c in range(NUM_COLOURS) for s in range(NUM_SHAPES)])
    assert set(prompts.unique().tolist()) <= ids  # every zero-shot prompt token is a trained row
    assert len(ids) < 60
