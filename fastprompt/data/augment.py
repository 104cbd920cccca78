"""Training augmentation on the device, batched: random resized crop, horizontal flip, normalise.

Semantics follow torchvision's `RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3),
interpolation=BICUBIC, antialias=True)` + `RandomHorizontalFlip(0.5)` + `Normalize(mean, std)`:
crop boxes are drawn per sample exactly like `RandomResizedCrop.get_params` (10 tries, then the
centre fallback), and the crop is resampled with the antialiased bicubic filter (Keys a = -0.5,
support scaled by the shrink factor) that `F.interpolate(..., mode="bicubic", antialias=True)` and
PIL use.

Two ways to apply the boxes, same result (to float rounding):

* "matmul": antialiased resampling is linear and separable, so crop + resize + flip of sample b is
  `Wy_b @ X_b @ Wx_b^T` with per-sample weight matrices Wy_b [S, H] and Wx_b [S, W] that are zero
  outside the crop (and whose rows are reversed for a flip). The whole batch is two batched
  matmuls and a few element-wise ops, whatever the boxes: no per-sample kernel launches, no
  Python loop. The result is clipped to 0..255 once at the end. Used on accelerators.
* "loop": per-sample `torchvision.transforms.v2.functional.resized_crop` on the uint8 image.
  On the CPU this is faster (torch's vectorised uint8 kernel touches only the crop, where the
  matmul path does dense S x H x W work). Like PIL it rounds to uint8 after each of the two
  separable passes, so on images with hard edges it can differ from the float result where
  bicubic overshoot gets clipped; on natural images the two agree to a few levels of 255.

Measured on this project's CI machine (2 shared, busy CPU cores, torch 2.14, batch 64 of 256x341
uint8 -> 224, median of 3): loop 0.26 s, matmul 1.5 s (3.1 s from a list of differently sized
images), so "auto" uses the loop on the CPU. On a GPU the
matmul path is a fixed ~25 kernels per batch (about 56 GFLOP for B = 256 at 256x341 -> 224, on
the order of a millisecond on an H100) where the loop launches ~5 kernels per image from Python;
it was not timed on a GPU in this session (none was lent).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
TRIES = 10  # torchvision's attempts before falling back to a centre crop


def sample_crop_boxes(heights: torch.Tensor, widths: torch.Tensor, *, scale=SCALE, ratio=RATIO,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample RandomResizedCrop boxes.

    heights, widths: int64 [B] image sizes. Returns int64 [B, 4] rows (top, left, h, w). Each
    sample tries TRIES (area fraction, log-uniform aspect) draws and keeps the first that fits,
    else takes torchvision's centre fallback (the whole image, clamped to the ratio range).
    Random numbers come from `generator` (on its device), so a seeded generator fixes the boxes.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    H = heights.to(gen_device, torch.float64)
    W = widths.to(gen_device, torch.float64)
    B = H.numel()
    u = torch.rand(B, 2 * TRIES + 2, generator=generator, device=gen_device, dtype=torch.float64)
    area = H * W
    target = area[:, None] * (scale[0] + u[:, :TRIES] * (scale[1] - scale[0]))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + u[:, TRIES:2 * TRIES] * (log_hi - log_lo))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # index of the first fitting try
    found = fits.any(dim=1)
    w_try = w.gather(1, first).squeeze(1)
    h_try = h.gather(1, first).squeeze(1)
    top_try = torch.floor(u[:, -2] * (H - h_try + 1))
    left_try = torch.floor(u[:, -1] * (W - w_try + 1))

    # Centre fallback, clamped to the ratio range like torchvision.
    in_ratio = W / H
    w_fb = torch.where(in_ratio > ratio[1], torch.round(H * ratio[1]), W)
    h_fb = torch.where(in_ratio < ratio[0], torch.round(W / ratio[0]), H)
    top_fb = torch.div(H - h_fb, 2, rounding_mode="floor")
    left_fb = torch.div(W - w_fb, 2, rounding_mode="floor")

    boxes = torch.stack([
        torch.where(found, top_try, top_fb), torch.where(found, left_try, left_fb),
        torch.where(found, h_try, h_fb), torch.where(found, w_try, w_fb),
    ], dim=1)
    return boxes.to(torch.int64)


def _keys_cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(start: torch.Tensor, length: torch.Tensor, out_size: int, full_size: int,
                   flip: torch.Tensor | None = None) -> torch.Tensor:
    """Weights [B, out_size, full_size] that resample pixels [start, start+length) to out_size.

    Row i holds the antialiased bicubic taps of output pixel i, computed as torch's
    `_upsample_bicubic2d_aa` does (centre scale*(i+0.5), support 2*max(scale, 1), taps clipped to
    the crop and renormalised). Rows are reversed where `flip` [B] bool is set.
    """
    # float32 like torch's own kernel for float inputs (and cheap on any GPU, unlike float64).
    device, f32 = start.device, torch.float32
    scale = (length.to(f32) / out_size)[:, None]  # [B, 1]
    support = torch.where(scale >= 1, 2.0 * scale, torch.full_like(scale, 2.0))
    invscale = torch.where(scale >= 1, 1.0 / scale, torch.ones_like(scale))
    center = scale * (torch.arange(out_size, device=device, dtype=f32) + 0.5)  # [B, S]
    lo = torch.clamp(torch.trunc(center - support + 0.5), min=0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), length.to(f32)[:, None])
    x = torch.arange(full_size, device=device, dtype=f32)[None, :] - start.to(f32)[:, None]
    x = x[:, None, :]  # [B, 1, L]: positions in crop coordinates
    taps = _keys_cubic((x - center[..., None] + 0.5) * invscale[..., None])
    taps = taps * ((x >= lo[..., None]) & (x < hi[..., None]))
    taps = taps / taps.sum(dim=-1, keepdim=True)
    if flip is not None:
        taps = torch.where(flip[:, None, None], taps.flip(1), taps)
    return taps


class GpuAugment(torch.nn.Module):
    """Random resized crop + horizontal flip + CLIP normalisation for a batch, on the images' device.

    forward(images, generator=None): images is a uint8 tensor [B, 3, H, W] or a list of B uint8
    tensors [3, H_b, W_b] (sizes may differ; all on one device). Returns float32 [B, 3, S, S]
    normalised with (x / 255 - mean) / std. Deterministic for a given `generator` (a
    torch.Generator on the CPU or on the images' device).

    method: "matmul" (batched weight-matrix resampling), "loop" (per-sample torchvision uint8
    resize) or "auto" (loop on the CPU, matmul elsewhere); see the module docstring for timings.
    A list of differently sized images is zero-padded into one batch for the matmul path.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], *,
                 scale=SCALE, ratio=RATIO, flip_p: float = 0.5, method: str = "auto"):
        super().__init__()
        if method not in ("auto", "matmul", "loop"):
            raise ValueError(f"method must be 'auto', 'matmul' or 'loop', got {method!r}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean!r} and {std!r}")
        self.image_size = int(image_size)
        self.scale, self.ratio, self.flip_p, self.method = tuple(scale), tuple(ratio), float(flip_p), method
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def sample_params(self, sizes: torch.Tensor, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes int64 [B, 4] (top, left, h, w) and flips bool [B] for image sizes int64 [B, 2] (H, W)."""
        boxes = sample_crop_boxes(sizes[:, 0], sizes[:, 1], scale=self.scale, ratio=self.ratio, generator=generator)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        flips = torch.rand(sizes.shape[0], generator=generator, device=gen_device) < self.flip_p
        return boxes, flips

    def forward(self, images: torch.Tensor | list[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
            sizes = torch.tensor([[images.shape[2], images.shape[3]]], dtype=torch.int64).expand(images.shape[0], 2)
            dtype, device = images.dtype, images.device
        else:
            if not images:
                raise ValueError("GpuAugment got an empty list of images")
            bad = [tuple(t.shape) for t in images if t.dim() != 3 or t.shape[0] != 3]
            if bad:
                raise ValueError(f"expected each image as [3, H, W], got shapes {bad[:3]}")
            sizes = torch.tensor([[t.shape[1], t.shape[2]] for t in images], dtype=torch.int64)
            dtype, device = images[0].dtype, images[0].device
        if dtype != torch.uint8:
            raise ValueError(f"GpuAugment expects uint8 images (as TrainImageCache stores them), got {dtype}")
        boxes, flips = self.sample_params(sizes, generator)
        method = self.method if self.method != "auto" else ("loop" if device.type == "cpu" else "matmul")
        if method == "loop":
            out = self._apply_loop(images, boxes.tolist(), flips.tolist())
        else:
            # fp32 even inside an autocast region: bf16 matmuls would cost about a grey level.
            with torch.autocast(device.type, enabled=False):
                out = self._apply_matmul(images, sizes, boxes.to(device), flips.to(device))
        return (out - self.mean * 255.0) / (self.std * 255.0)

    def _apply_loop(self, images, boxes: list[list[int]], flips: list[bool]) -> torch.Tensor:
        S = self.image_size
        crops = []
        for img, (top, left, h, w), flip in zip(images, boxes, flips):
            crop = TF.resized_crop(img, top, left, h, w, [S, S], interpolation=InterpolationMode.BICUBIC, antialias=True)
            crops.append(crop.flip(-1) if flip else crop)
        return torch.stack(crops).to(torch.float32)

    def _apply_matmul(self, images, sizes: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        S = self.image_size
        B = boxes.shape[0]
        Hmax, Wmax = int(sizes[:, 0].max()), int(sizes[:, 1].max())
        # Channels folded next to width ([B, H, C, W]) so each stage is one plain batched matmul.
        if isinstance(images, torch.Tensor):
            x = images.permute(0, 2, 1, 3).to(torch.float32)
        else:
            # Zero padding (never uninitialised memory: a zero weight times NaN would still be NaN).
            x = torch.zeros(B, Hmax, 3, Wmax, dtype=torch.float32, device=boxes.device)
            for b, img in enumerate(images):
                x[b, : img.shape[1], :, : img.shape[2]] = img.permute(1, 0, 2)
        wy = resize_weights(boxes[:, 0], boxes[:, 2], S, Hmax)               # [B, S, H]
        wx = resize_weights(boxes[:, 1], boxes[:, 3], S, Wmax, flip=flips)   # [B, S, W]
        rows = torch.bmm(wy, x.reshape(B, Hmax, 3 * Wmax))                    # [B, S, 3*W]
        out = torch.bmm(rows.view(B, S * 3, Wmax), wx.transpose(1, 2))       # [B, S*3, S]
        out = out.view(B, S, 3, S).permute(0, 2, 1, 3).contiguous()           # [B, 3, S, S]
        # Clip bicubic overshoot to the pixel range, as the uint8 (PIL / torchvision) pipelines do.
        return out.clamp_(0.0, 255.0)
