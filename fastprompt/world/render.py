"""Vectorised rendering of the world: one coloured shape per image, drawn with torch on a batch.

Everything random is drawn from the `torch.Generator` passed in, in a fixed order, so the same
generator state always gives the same pixels. Images are rendered at `SUPERSAMPLE` x resolution
and averaged down (anti-aliased edges).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .domains import CLEAN, Domain
from .vocabulary import COLOURS, NUM_COLOURS, NUM_SHAPES, SHAPES

IMAGE_SIZE = 32
SUPERSAMPLE = 2
_PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # [8, 3]
_BACKGROUND_GREY = {0: (0.05, 0.25), 1: (0.75, 0.95)}  # dark, light: U(lo, hi) grey level


def _polygon(radii: list[float], start_deg: float = 90.0) -> torch.Tensor:
    """Vertices [K, 2] (x right, y up) at the given radii, evenly spaced in angle from `start_deg`."""
    k = len(radii)
    angles = [math.radians(start_deg + 360.0 * i / k) for i in range(k)]
    return torch.tensor([[r * math.cos(a), r * math.sin(a)] for r, a in zip(radii, angles)])


_TRIANGLE = _polygon([1.0, 1.0, 1.0]) + torch.tensor([0.0, -0.15])  # centroid a little low: fills the box
_STAR = _polygon([1.0, 0.42] * 5)


def _inside_polygon(u: torch.Tensor, v: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """Even-odd rule: bool mask of points (u, v) [...] inside the polygon `vertices` [K, 2]."""
    inside = torch.zeros_like(u, dtype=torch.bool)
    k = vertices.shape[0]
    for i in range(k):
        (ax, ay), (bx, by) = vertices[i].tolist(), vertices[(i + 1) % k].tolist()
        if ay == by:
            continue
        crosses = ((ay > v) != (by > v)) & (u < (bx - ax) * (v - ay) / (by - ay) + ax)
        inside ^= crosses
    return inside


def shape_mask(shape: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Float mask of shape index `shape` at object coordinates (u, v) (radius 1, y up)."""
    name = SHAPES[shape]
    r2 = u * u + v * v
    if name == "circle":
        m = r2 <= 0.85 ** 2
    elif name == "square":
        m = torch.maximum(u.abs(), v.abs()) <= 0.72
    elif name == "triangle":
        m = _inside_polygon(u, v, _TRIANGLE)
    elif name == "diamond":
        m = u.abs() / 0.62 + v.abs() <= 1.0
    elif name == "star":
        m = _inside_polygon(u, v, _STAR)
    elif name == "cross":
        arm, reach = 0.28, 0.92
        m = ((u.abs() <= arm) & (v.abs() <= reach)) | ((v.abs() <= arm) & (u.abs() <= reach))
    elif name == "ring":
        m = (r2 <= 0.92 ** 2) & (r2 >= 0.5 ** 2)
    elif name == "heart":
        x, y = u * 1.2, v * 1.2 + 0.12
        m = (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    else:  # pragma: no cover - SHAPES and this function are edited together
        raise ValueError(f"no mask for shape {name!r}")
    return m.float()


def _hue_rotation(degrees: torch.Tensor) -> torch.Tensor:
    """[B, 3, 3] matrices rotating RGB about the grey axis by `degrees` [B] (a hue shift)."""
    a = torch.deg2rad(degrees)
    cos, sin = torch.cos(a), torch.sin(a)
    k = 1.0 / 3.0
    s = math.sqrt(1.0 / 3.0)
    # Rodrigues' rotation about the unit vector (1, 1, 1)/sqrt(3).
    m = torch.empty(a.shape[0], 3, 3)
    diag = cos + (1 - cos) * k
    off_p = (1 - cos) * k + s * sin
    off_m = (1 - cos) * k - s * sin
    m[:, 0, 0] = m[:, 1, 1] = m[:, 2, 2] = diag
    m[:, 0, 1] = m[:, 1, 2] = m[:, 2, 0] = off_m
    m[:, 0, 2] = m[:, 1, 0] = m[:, 2, 1] = off_p
    return m


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def _strokes(n: int, count: int, grid: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` line strokes per image: masks [B, count, G, G] and colours [B, count, 3]."""
    size = float(IMAGE_SIZE)
    p0 = torch.rand(n, count, 2, generator=generator) * size
    p1 = torch.rand(n, count, 2, generator=generator) * size
    width = _uniform(n * count, 1.0, 2.0, generator).view(n, count)
    colour = _PALETTE[torch.randint(NUM_COLOURS, (n, count), generator=generator)]
    x, y = grid[0].view(1, 1, *grid.shape[1:]), grid[1].view(1, 1, *grid.shape[1:])
    d = p1 - p0
    t = ((x - p0[..., 0, None, None]) * d[..., 0, None, None] + (y - p0[..., 1, None, None]) * d[..., 1, None, None])
    t = (t / (d.pow(2).sum(-1)[..., None, None] + 1e-6)).clamp(0, 1)
    dx = x - (p0[..., 0, None, None] + t * d[..., 0, None, None])
    dy = y - (p0[..., 1, None, None] + t * d[..., 1, None, None])
    mask = (dx * dx + dy * dy <= (width[..., None, None] / 2) ** 2).float()
    return mask, colour


def render(colour: torch.Tensor, shape: torch.Tensor, size: torch.Tensor, background: torch.Tensor, *,
           generator: torch.Generator, domain: Domain = CLEAN) -> torch.Tensor:
    """Render one object per image.

    colour, shape, size, background: int64 [B] indices into COLOURS, SHAPES, SIZES, BACKGROUNDS.
    Returns float32 [B, 3, 32, 32] in [0, 1]. Deterministic given the generator's state.
    """
    n = colour.shape[0]
    if not (shape.shape == size.shape == background.shape == (n,)):
        raise ValueError("colour, shape, size and background must be 1-D tensors of the same length")
    if n and (int(colour.max()) >= NUM_COLOURS or int(shape.max()) >= NUM_SHAPES or int(size.max()) > 1
              or int(background.max()) > 1 or min(int(t.min()) for t in (colour, shape, size, background)) < 0):
        raise ValueError("attribute index out of range")
    g = IMAGE_SIZE * SUPERSAMPLE
    coords = (torch.arange(g, dtype=torch.float32) + 0.5) / SUPERSAMPLE  # pixel units, y down
    grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy"))  # [2, G, G]: x, y

    # Draws, in a fixed order.
    lo, hi = _BACKGROUND_GREY[0]
    grey = torch.where(background.bool(), _uniform(n, *_BACKGROUND_GREY[1], generator), _uniform(n, lo, hi, generator))
    tint = torch.randn(n, 3, generator=generator) * domain.background_tint
    centre = IMAGE_SIZE / 2 + _uniform(2 * n, -domain.offset, domain.offset, generator).view(n, 2)
    angle = torch.deg2rad(_uniform(n, -domain.rotation, domain.rotation, generator))
    radius = torch.tensor(domain.radius)[size] * _uniform(n, 1 - domain.radius_jitter, 1 + domain.radius_jitter, generator)
    hue = domain.hue_offset + _uniform(n, -domain.hue_shift, domain.hue_shift, generator)
    rgb = _PALETTE[colour] + torch.randn(n, 3, generator=generator) * domain.colour_jitter
    strokes = _strokes(n, domain.distractors, grid, generator) if domain.distractors else None
    noise = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * domain.noise

    if domain.hue_shift or domain.hue_offset:
        rgb = torch.bmm(_hue_rotation(hue), rgb.unsqueeze(-1)).squeeze(-1)
    rgb = rgb.clamp(0, 1)
    image = (grey[:, None] + tint).clamp(0, 1)[:, :, None, None].expand(n, 3, g, g)
    if strokes is not None:
        for k in range(domain.distractors):
            m = strokes[0][:, k, None]
            image = image * (1 - m) + strokes[1][:, k, :, None, None] * m

    # Object coordinates: centred, rotated, scaled to radius 1, y up.
    dx = grid[0][None] - centre[:, 0, None, None]
    dy = grid[1][None] - centre[:, 1, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    r = radius[:, None, None]
    u = (dx * cos + dy * sin) / r
    v = -(-dx * sin + dy * cos) / r
    mask = torch.zeros(n, g, g)
    for s in range(NUM_SHAPES):
        rows = (shape == s).nonzero().flatten()
        if rows.numel():
            mask[rows] = shape_mask(s, u[rows], v[rows])
    image = image * (1 - mask[:, None]) + rgb[:, :, None, None] * mask[:, None]
    image = F.avg_pool2d(image, SUPERSAMPLE)
    return (image + noise).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [0, 1] -> uint8, rounded (what a PNG stores)."""
    return (images * 255.0).round().clamp(0, 255).to(torch.uint8)
