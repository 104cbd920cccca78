"""Captions: the right words, the right positives, and the token rows pretraining trains."""
import open_clip
import torch

import fastprompt.clip  # noqa: F401  (registers the fastprompt-world config)
from fastprompt.world.captions import (ATTRIBUTES, FULL_TEMPLATES, TEMPLATES, CaptionTable, named_attributes,
                                       positives, vocabulary_token_ids)
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
    for i in range(20):  # the words of the named attributes are in the caption's text
        text = _text(tokens[i])
        words = {"colour": ["red", "orange", "yellow", "green", "turquoise", "blue", "purple", "pink"],
                 "shape": ["circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart"],
                 "size": ["small", "large"], "background": ["dark", "light"]}
        for a, name in enumerate(ATTRIBUTES):
            if named[i, a]:
                assert words[name][int(attrs[i, a])] in text.split(), (text, name)


def test_positives_match_a_brute_force_check():
    g = torch.Generator().manual_seed(2)
    attrs = torch.randint(2, (40, 4), generator=g)
    constraints = torch.where(torch.rand(40, 4, generator=g) < 0.5, torch.randint(2, (40, 4), generator=g), -1)
    expected = torch.tensor([[all(c == -1 or c == a for a, c in zip(attrs[i].tolist(), constraints[j].tolist()))
                              for j in range(40)] for i in range(40)])
    assert torch.equal(positives(attrs, constraints), expected)


def test_named_attributes_and_vocabulary():
    assert named_attributes("a {size} {shape}.") == (False, True, True, False)
    ids = set(vocabulary_token_ids(TOKENIZER).tolist())
    prompts = TOKENIZER([f"a photo of a {class_name(c, s)}." for c in range(NUM_COLOURS) for s in range(NUM_SHAPES)])
    assert set(prompts.unique().tolist()) <= ids  # every zero-shot prompt token is a trained row
    assert len(ids) < 60
