"""Rendering domains: how objects are placed, coloured, disturbed and cluttered.

`clean` is the pretraining distribution. The other domains shift one or more of its factors, so a
prompt trained in one domain can be tested in another (cross-domain), and a downstream task can be
made harder than what the backbone was pretrained on (zero-shot headroom).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..errors import DatasetError


@dataclass(frozen=True)
class Domain:
    """Rendering settings; every random draw stays inside these ranges.

    offset: the object's centre is image centre + U(-offset, offset) px on each axis.
    rotation: U(-rotation, rotation) degrees.
    radius: the object's radius in px for (small, large), each scaled by U(1 - radius_jitter, 1 + radius_jitter).
    colour_jitter: std of the per-image additive noise on the object's RGB.
    hue_shift: the object's hue is rotated by U(-hue_shift, hue_shift) degrees.
    hue_offset: and by a further hue_offset degrees, the same for every image (a colour cast).
    noise: std of the per-pixel Gaussian noise (images in [0, 1]).
    distractors: how many line strokes of random palette colours are drawn behind the object.
    background_tint: std of a per-image colour tint added to the grey background.
    """

    offset: float = 3.0
    rotation: float = 15.0
    radius: tuple[float, float] = (7.0, 11.0)
    radius_jitter: float = 0.1
    colour_jitter: float = 0.04
    hue_shift: float = 0.0
    hue_offset: float = 0.0
    noise: float = 0.03
    distractors: int = 0
    background_tint: float = 0.02

    def to_dict(self) -> dict:
        return asdict(self)


CLEAN = Domain()

DOMAINS: dict[str, Domain] = {
    "clean": CLEAN,
    # Two coloured strokes behind the object and more noise: colour is no longer one blob.
    "clutter": replace(CLEAN, distractors=2, noise=0.06),
    # Hues rotate by up to 35 degrees and channels wobble: neighbouring colours blur into each other.
    "jitter": replace(CLEAN, hue_shift=35.0, colour_jitter=0.08),
    # Every object's hue rotated by 25 degrees, as through a colour cast: each colour drifts towards its
    # neighbour (red towards orange, ...), the same way in every image, so the colour words fit less well
    # but the colours stay apart (a head on the frozen image features can learn them again).
    "cast": replace(CLEAN, hue_offset=25.0),
    # Anywhere in the frame (partly cut off at the border), any rotation, more size spread.
    "placement": replace(CLEAN, offset=10.0, rotation=180.0, radius_jitter=0.25),
    # All of the above at once.
    "shifted": replace(CLEAN, distractors=2, noise=0.06, hue_shift=25.0, colour_jitter=0.06, offset=7.0,
                       rotation=45.0),
}


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise DatasetError(f"unknown world domain {name!r}; known: {', '.join(DOMAINS)}")
    return DOMAINS[name]
