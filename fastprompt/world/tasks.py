"""Downstream classification tasks on the world: which classes, in which label order.

The base-to-new protocol trains on the first ceil(N/2) labels and tests the rest as new classes,
so a task's label order *is* its base/new split. Each class is one or more (colour, shape) pairs.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import DatasetError
from .vocabulary import (COLOUR_NAMES, HELD_OUT_PAIRS, NUM_COLOURS, NUM_SHAPES, SHAPES, class_name, pair_index)


@dataclass(frozen=True)
class WorldClass:
    name: str
    pairs: tuple[int, ...]  # canonical pair indices whose images belong to this class


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    classes: tuple[WorldClass, ...]  # in label order: base = the first ceil(N/2)

    @property
    def classnames(self) -> list[str]:
        return [c.name for c in self.classes]


def _pair_class(c: int, s: int) -> WorldClass:
    return WorldClass(class_name(c, s), (pair_index(c, s),))


def _by_shape() -> Task:
    order = [(c, s) for s in range(NUM_SHAPES) for c in range(NUM_COLOURS)]  # shape-major
    return Task("by_shape", "all 64 pairs; base = the pairs of circle, square, triangle, diamond, new = star, "
                "cross, ring, heart: new classes name shapes that no base class names",
                tuple(_pair_class(c, s) for c, s in order))


def _by_colour() -> Task:
    order = [(c, s) for c in range(NUM_COLOURS) for s in range(NUM_SHAPES)]  # colour-major
    return Task("by_colour", "all 64 pairs; base = red, orange, yellow, green pairs, new = turquoise, blue, "
                "purple, pink: new classes name colours that no base class names",
                tuple(_pair_class(c, s) for c, s in order))


def _mixed() -> Task:
    order = [(c, s) for c in range(NUM_COLOURS) for s in range(NUM_SHAPES)]
    random.Random("fastprompt-world-mixed").shuffle(order)
    return Task("mixed", "all 64 pairs in a fixed random order: base and new classes share every word",
                tuple(_pair_class(c, s) for c, s in order))


def _novel() -> Task:
    held = sorted(HELD_OUT_PAIRS)
    # 16 seen pairs (base), two per colour and per shape like the held-out ones (offsets 2 and 6).
    seen = sorted((c, (c + k) % NUM_SHAPES) for c in range(NUM_COLOURS) for k in (2, 6))
    return Task("novel", "32 pairs; base = 16 pairs pretraining showed, new = the 16 pairs pretraining never "
                "showed (each colour and shape twice in both halves)",
                tuple(_pair_class(c, s) for c, s in [*seen, *held]))


def _shapes() -> Task:
    return Task("shapes", "8 classes named by shape alone (any colour); base = circle, square, triangle, diamond",
                tuple(WorldClass(SHAPES[s], tuple(pair_index(c, s) for c in range(NUM_COLOURS)))
                      for s in range(NUM_SHAPES)))


TASKS: dict[str, Task] = {t.name: t for t in (_by_shape(), _by_colour(), _mixed(), _novel(), _shapes())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DatasetError(f"unknown world task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


assert all(len(set(sum((c.pairs for c in t.classes), ()))) == sum(len(c.pairs) for c in t.classes)
           for t in TASKS.values()), "a pair belongs to two classes of one task"
assert len(COLOUR_NAMES) == NUM_COLOURS
