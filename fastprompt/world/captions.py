"""Captions of rendered images, and which captions are true of which images.

A template names some of an image's four attributes (colour, shape, size, background); a caption
is true of every image whose named attributes match, whatever the unnamed ones are. Pretraining
treats every true (image, caption) pair in a batch as a positive (`positives`).

Half the captions start with up to 20 filler words ("this image of the ... a red star."), so the
text tower learns to read an object's words wherever they stand: CoOp's 16 context vectors put the
class name at positions 17-18, far beyond the longest template.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .vocabulary import BACKGROUNDS, COLOUR_NAMES, SHAPES, SIZES

ATTRIBUTES = ("colour", "shape", "size", "background")
_WORDS = {"colour": COLOUR_NAMES, "shape": SHAPES, "size": SIZES, "background": BACKGROUNDS}

# {colour} {shape} {size} {background}; the first is the zero-shot template with "<colour> <shape>".
FULL_TEMPLATES = (
    "a photo of a {colour} {shape}.",
    "a {colour} {shape}.",
    "a picture of a {colour} {shape}.",
    "a rendering of a {colour} {shape}.",
    "a {size} {colour} {shape}.",
    "a {colour} {shape} on a {background} background.",
    "a {size} {colour} {shape} on a {background} background.",
    "there is a {colour} {shape} in the middle.",
    "the {shape} is {colour}.",
    "a drawing of a {shape} coloured {colour}.",
)
PARTIAL_TEMPLATES = (
    "a {colour} shape.",
    "something {colour}.",
    "a photo of a {shape}.",
    "a {shape}.",
    "a {size} {shape}.",
    "a {size} {colour} object.",
    "a picture with a {background} background.",
)
TEMPLATES = FULL_TEMPLATES + PARTIAL_TEMPLATES
PARTIAL_PROBABILITY = 0.35  # share of pretraining captions drawn from PARTIAL_TEMPLATES
# Words that say nothing about an image (no attribute word among them), and how many may lead a caption.
FILLER_WORDS = ("a", "an", "the", "this", "is", "it", "there", "here", "image", "picture", "photo", "of", "with",
                "some", "in", "and", "simple", "rendered", "shows")
FILLER_PROBABILITY = 0.5
MAX_FILLER = 20


def named_attributes(template: str) -> tuple[bool, ...]:
    """Which of ATTRIBUTES the template names, in ATTRIBUTES order."""
    return tuple("{" + a + "}" in template for a in ATTRIBUTES)


@dataclass
class CaptionTable:
    """Every caption of every template for every attribute combination, tokenised once.

    tokens: int64 [T, 8, 8, 2, 2, L] token ids of template t with (colour, shape, size, background)
        filled in (unnamed attributes do not change the text); named: bool [T, 4];
    filler: int64 [F] the token ids of FILLER_WORDS.
    """

    tokens: torch.Tensor
    named: torch.Tensor
    filler: torch.Tensor

    @classmethod
    def build(cls, tokenizer) -> "CaptionTable":
        dims = (len(COLOUR_NAMES), len(SHAPES), len(SIZES), len(BACKGROUNDS))
        texts = [
            t.format(**{a: _WORDS[a][i] for a, i in zip(ATTRIBUTES, idx)})
            for t in TEMPLATES for idx in itertools.product(*(range(d) for d in dims))
        ]
        tokens = tokenizer(texts).view(len(TEMPLATES), *dims, -1)
        named = torch.tensor([named_attributes(t) for t in TEMPLATES])
        words = tokenizer(list(FILLER_WORDS))
        if not bool(((words != 0).sum(dim=1) == 3).all()):  # start, one token, end of text
            raise ValueError("every filler word must be a single token of this tokenizer")
        return cls(tokens=tokens, named=named, filler=words[:, 1].clone())

    def vocabulary(self) -> torch.Tensor:
        """Sorted ids of every token a sampled caption can contain (padding included)."""
        return torch.unique(torch.cat([self.tokens.flatten(), self.filler]))

    def sample(self, attributes: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One caption per image. attributes: int64 [B, 4] -> (tokens [B, L], constraints [B, 4]).

        constraints[b, a] is the attribute value caption b names, or -1 where it names none.
        """
        n = attributes.shape[0]
        partial = torch.rand(n, generator=generator) < PARTIAL_PROBABILITY
        full_t = torch.randint(len(FULL_TEMPLATES), (n,), generator=generator)
        part_t = len(FULL_TEMPLATES) + torch.randint(len(PARTIAL_TEMPLATES), (n,), generator=generator)
        template = torch.where(partial, part_t, full_t)
        a = attributes
        tokens = self.tokens[template, a[:, 0], a[:, 1], a[:, 2], a[:, 3]]
        constraints = torch.where(self.named[template], a, torch.full_like(a, -1))
        return self._with_filler(tokens, generator), constraints

    def _with_filler(self, tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A FILLER_PROBABILITY share of the captions get 1..MAX_FILLER filler tokens after the start token."""
        n, length = tokens.shape
        count = torch.randint(1, MAX_FILLER + 1, (n,), generator=generator)
        count = torch.where(torch.rand(n, generator=generator) < FILLER_PROBABILITY, count, torch.zeros_like(count))
        words = self.filler[torch.randint(self.filler.numel(), (n, length), generator=generator)]
        pos = torch.arange(length)
        shifted = tokens.gather(1, (pos[None] - count[:, None]).clamp(min=0))  # caption moved right by count
        is_filler = (pos[None] >= 1) & (pos[None] <= count[:, None])
        return torch.where(is_filler, words, shifted)


def positives(attributes: torch.Tensor, constraints: torch.Tensor) -> torch.Tensor:
    """bool [B_images, B_captions]: caption j is true of image i (every attribute it names matches)."""
    match = (constraints[None] == -1) | (constraints[None] == attributes[:, None])
    return match.all(dim=-1)
