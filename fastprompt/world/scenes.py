"""Random scene attributes: which object, how big, on which background."""
from __future__ import annotations

import torch

from .vocabulary import HELD_OUT_PAIRS, NUM_COLOURS, NUM_SHAPES, pair_index

# Canonical pair indices (colour * 8 + shape) that pretraining may show, and the 16 it never shows.
SEEN_PAIRS = torch.tensor([pair_index(c, s) for c in range(NUM_COLOURS) for s in range(NUM_SHAPES)
                           if (c, s) not in HELD_OUT_PAIRS])
HELD_OUT_PAIR_INDICES = torch.tensor(sorted(pair_index(c, s) for c, s in HELD_OUT_PAIRS))


def attributes_for_pairs(pairs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """int64 [B, 4] (colour, shape, size, background) for canonical pair indices `pairs` [B];
    size and background drawn uniformly."""
    n = pairs.shape[0]
    size = torch.randint(2, (n,), generator=generator)
    background = torch.randint(2, (n,), generator=generator)
    return torch.stack([pairs // NUM_SHAPES, pairs % NUM_SHAPES, size, background], dim=1)


def sample_pretraining_attributes(n: int, generator: torch.Generator) -> torch.Tensor:
    """int64 [n, 4]: a uniformly drawn seen pair per image, size and background uniform."""
    pairs = SEEN_PAIRS[torch.randint(SEEN_PAIRS.numel(), (n,), generator=generator)]
    return attributes_for_pairs(pairs, generator)
