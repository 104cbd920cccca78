"""What the rendered world is made of: eight colours, eight shapes, two sizes, two backgrounds.

An object is a (colour, shape) pair; its class name is "<colour> <shape>" (e.g. "red star").
Sixteen of the 64 pairs never appear in pretraining (`HELD_OUT_PAIRS`): every colour and every
shape is held out exactly twice, so each held-out pair is made of words the model has seen, in a
combination it has not.
"""
from __future__ import annotations

COLOURS: dict[str, tuple[float, float, float]] = {  # name -> RGB in [0, 1]
    "red": (0.90, 0.12, 0.12),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.95, 0.88, 0.10),
    "green": (0.15, 0.70, 0.20),
    "turquoise": (0.10, 0.80, 0.80),
    "blue": (0.15, 0.30, 0.95),
    "purple": (0.55, 0.20, 0.80),
    "pink": (1.00, 0.50, 0.75),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart")
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUNDS: tuple[str, ...] = ("dark", "light")

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
NUM_COLOURS, NUM_SHAPES = len(COLOUR_NAMES), len(SHAPES)
NUM_PAIRS = NUM_COLOURS * NUM_SHAPES

# Pair (c, s) is held out when s - c is 0 or 4 (mod 8): a Latin-square pattern, two per colour and shape.
HELD_OUT_OFFSETS = (0, 4)
HELD_OUT_PAIRS: frozenset[tuple[int, int]] = frozenset(
    (c, (c + k) % NUM_SHAPES) for c in range(NUM_COLOURS) for k in HELD_OUT_OFFSETS
)


def pair_index(colour: int, shape: int) -> int:
    """The canonical index of a (colour, shape) pair: colour-major, 0..63."""
    return colour * NUM_SHAPES + shape


def pair_of(index: int) -> tuple[int, int]:
    return divmod(index, NUM_SHAPES)


def class_name(colour: int, shape: int) -> str:
    return f"{COLOUR_NAMES[colour]} {SHAPES[shape]}"


def folder_name(colour: int, shape: int) -> str:
    """The class folder of a pair in an ImageFolder tree ("red_star": '_' reads as a space)."""
    return f"{COLOUR_NAMES[colour]}_{SHAPES[shape]}"


def is_held_out(colour: int, shape: int) -> bool:
    return (colour, shape) in HELD_OUT_PAIRS
