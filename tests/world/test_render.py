"""The world's rendering: deterministic, the right colours and sizes, shapes that differ, held-out pairs."""
import itertools
from dataclasses import replace

import pytest
import torch

from fastprompt.world.domains import CLEAN, DOMAINS
from fastprompt.world.render import IMAGE_SIZE, render, shape_mask
from fastprompt.world.scenes import SEEN_PAIRS, sample_pretraining_attributes
from fastprompt.world.vocabulary import COLOURS, HELD_OUT_PAIRS, NUM_COLOURS, NUM_SHAPES, SHAPES, pair_of


def _render(colour, shape, size, background, seed=0, domain=CLEAN):
    t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return render(t(colour), t(shape), t(size), t(background), generator=torch.Generator().manual_seed(seed),
                  domain=domain)


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_same_seed_same_pixels_other_seed_other_pixels(domain):
    args = ([0, 3, 7, 5], [1, 4, 6, 7], [0, 1, 0, 1], [1, 0, 0, 1])
    a, b = _render(*args, seed=3, domain=DOMAINS[domain]), _render(*args, seed=3, domain=DOMAINS[domain])
    assert a.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert (a - _render(*args, seed=4, domain=DOMAINS[domain])).abs().mean() > 0.01


def test_object_has_its_palette_colour_and_size():
    plain = replace(CLEAN, noise=0.0, colour_jitter=0.0, background_tint=0.0, offset=0.0, rotation=0.0, radius_jitter=0.0)
    for c, rgb in enumerate(COLOURS.values()):
        img = _render([c, c], [1, 1], [0, 1], [0, 1], domain=plain)  # squares: small on dark, large on light
        centre = img[:, :, IMAGE_SIZE // 2, IMAGE_SIZE // 2]
        torch.testing.assert_close(centre, torch.tensor([rgb, rgb]), atol=1e-6, rtol=0)
        # A square of half-side 0.72 * radius: area (1.44 r)^2 px; count pixels that hold the colour.
        covered = ((img - torch.tensor(rgb).view(1, 3, 1, 1)).abs().amax(1) < 1e-3).sum(dim=(1, 2)).float()
        expected = torch.tensor([(1.44 * r) ** 2 for r in plain.radius])
        torch.testing.assert_close(covered, expected, rtol=0.2, atol=0)


def test_a_colour_cast_rotates_every_hue_by_the_same_angle_about_the_grey_axis():
    plain = replace(CLEAN, noise=0.0, colour_jitter=0.0, background_tint=0.0, offset=0.0, rotation=0.0, radius_jitter=0.0)
    cast = replace(plain, hue_offset=DOMAINS["cast"].hue_offset)
    assert DOMAINS["cast"] == replace(CLEAN, hue_offset=25.0)
    a = torch.deg2rad(torch.tensor(25.0, dtype=torch.float64))
    k = torch.ones(3, dtype=torch.float64) / 3 ** 0.5
    for c, rgb in enumerate(COLOURS.values()):
        img = _render([c], [1], [1], [0], domain=cast)
        p = torch.tensor(rgb, dtype=torch.float64)  # Rodrigues' formula in float64, clipped as images are
        want = p * torch.cos(a) + torch.linalg.cross(k, p) * torch.sin(a) + k * (k @ p) * (1 - torch.cos(a))
        torch.testing.assert_close(img[0, :, IMAGE_SIZE // 2, IMAGE_SIZE // 2].double(), want.clamp(0, 1),
                                   atol=1e-5, rtol=0)
    # Only the object changes: the grey background is on the rotation axis.
    corner = lambda domain: _render([0], [1], [1], [0], domain=domain)[..., :2, :2]  # noqa: E731
    assert torch.equal(corner(cast), corner(plain))


def test_backgrounds_are_dark_and_light():
    img = _render([0, 0], [0, 0], [0, 0], [0, 1])
    corner = img[:, :, :3, :3].mean(dim=(1, 2, 3))
    assert corner[0] < 0.35 and corner[1] > 0.65


def test_every_pair_of_shapes_differs():
    grid = (torch.arange(64, dtype=torch.float32) + 0.5) / 32 - 1
    v, u = torch.meshgrid(-grid, grid, indexing="ij")
    masks = [shape_mask(s, u, v) for s in range(NUM_SHAPES)]
    for a, b in itertools.combinations(range(NUM_SHAPES), 2):
        iou = float((masks[a] * masks[b]).sum() / ((masks[a] + masks[b]) > 0).sum())
        assert iou < 0.85, (SHAPES[a], SHAPES[b], iou)
    assert all(0.15 < float(m.mean()) < 0.7 for m in masks)  # each fills a fair share of its box


def test_held_out_pairs_cover_each_colour_and_shape_twice_and_never_appear_in_pretraining():
    assert len(HELD_OUT_PAIRS) == 16
    assert sorted(c for c, _ in HELD_OUT_PAIRS) == sorted(list(range(NUM_COLOURS)) * 2)
    assert sorted(s for _, s in HELD_OUT_PAIRS) == sorted(list(range(NUM_SHAPES)) * 2)
    assert {pair_of(int(p)) for p in SEEN_PAIRS} == set(itertools.product(range(8), range(8))) - HELD_OUT_PAIRS
    a = sample_pretraining_attributes(20_000, torch.Generator().manual_seed(0))
    drawn = {(int(c), int(s)) for c, s in a[:, :2]}
    assert drawn == {pair_of(int(p)) for p in SEEN_PAIRS}  # every seen pair, and no held-out one
    assert set(a[:, 2].tolist()) == {0, 1} and set(a[:, 3].tolist()) == {0, 1}


def test_bad_attributes_are_refused():
    with pytest.raises(ValueError, match="out of range"):
        _render([8], [0], [0], [0])
    with pytest.raises(ValueError, match="same length"):
        render(torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long),
               torch.zeros(2, dtype=torch.long), generator=torch.Generator())
