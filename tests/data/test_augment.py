"""GpuAugment: crop-box sampling like RandomResizedCrop, resampling like torch's antialiased bicubic."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from fastprompt.data import GpuAugment, sample_crop_boxes

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def smooth_images(b, h, w, seed=0):
    """uint8 images without hard edges (bicubic overshoot stays inside 0..255)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, max(2, h // 8), max(2, w // 8), generator=g) * 180 + 40
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).round().to(torch.uint8)


def test_boxes_fit_and_follow_the_scale_and_ratio_ranges():
    n = 4000
    H = torch.full((n,), 200)
    W = torch.full((n,), 300)
    boxes = sample_crop_boxes(H, W, generator=torch.Generator().manual_seed(0))
    top, left, h, w = boxes.unbind(1)
    assert boxes.dtype == torch.int64
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 200).all() and (left + w <= 300).all()
    area = (h * w).double() / (200 * 300)
    ratio = w.double() / h.double()
    assert area.min() > 0.07 and area.max() <= 1.0
    assert ratio.min() > 0.74 and ratio.max() < 1.35  # 3/4..4/3 up to rounding
    # Same distribution as torchvision's own sampler (rejections included) on this 2:3 image.
    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, 200, 300), [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(n)], dtype=torch.float64)
    ref_area, ref_ratio = ref[:, 2] * ref[:, 3] / (200 * 300), ref[:, 3] / ref[:, 2]
    for ours, theirs in ((area, ref_area), (ratio, ref_ratio)):
        se = math.sqrt((ours.var() + theirs.var()).item() / n)
        assert abs(ours.mean().item() - theirs.mean().item()) < 4 * se
        assert abs(ours.median().item() - theirs.median().item()) < 0.05
    # Positions cover the whole range of valid offsets.
    assert (left == 0).any() and (left + w == 300).any()


def test_centre_fallback_for_extreme_aspect_ratios():
    # A 10 x 400 strip admits no 3/4..4/3 crop: torchvision falls back to a centred, ratio-clamped box.
    boxes = sample_crop_boxes(torch.tensor([10, 400]), torch.tensor([400, 10]), generator=torch.Generator().manual_seed(0))
    assert boxes.tolist() == [[0, (400 - 13) // 2, 10, 13], [(400 - 13) // 2, 0, 13, 10]]


def test_output_shape_dtype_and_normalisation():
    aug = GpuAugment(32, MEAN, STD)
    imgs = torch.full((6, 3, 40, 50), 128, dtype=torch.uint8)
    out = aug(imgs, torch.Generator().manual_seed(0))
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(out, expected.view(1, 3, 1, 1).expand_as(out), atol=1e-5)


@pytest.mark.parametrize("method", ["matmul", "loop"])
def test_normalisation_statistics_on_random_images(method):
    imgs = torch.randint(0, 256, (16, 3, 48, 48), dtype=torch.uint8)
    out = GpuAugment(24, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), method=method)(imgs, torch.Generator().manual_seed(0))
    # Uniform 0..255 pixels -> mean 0 after (x - 0.5)/0.25; interpolation averages, so |mean| stays small.
    assert abs(out.mean().item()) < 0.05
    assert -2 - 1e-5 <= out.min().item() < -1.5 and 1.5 < out.max().item() <= 2 + 1e-5  # 0..255 -> -2..2
    assert 0.3 < out.std().item() < 1.2  # interpolation smooths the noise but keeps it


@pytest.mark.parametrize("size, S", [((256, 341), 224), ((37, 50), 64), ((300, 200), 48), ((8, 8), 32)])
def test_matmul_path_equals_torch_antialiased_bicubic(size, S):
    H, W = size
    imgs = torch.randint(0, 256, (6, 3, H, W), dtype=torch.uint8)  # noise: the hardest case for resampling
    aug = GpuAugment(S, (0, 0, 0), (1 / 255, 1 / 255, 1 / 255), method="matmul")  # identity normalisation
    boxes, flips = aug.sample_params(torch.tensor([[H, W]] * 6), torch.Generator().manual_seed(5))
    out = aug(imgs, torch.Generator().manual_seed(5))
    for b, ((t, l, h, w), f) in enumerate(zip(boxes.tolist(), flips.tolist())):
        ref = TF.resized_crop(imgs[b].float(), t, l, h, w, [S, S], interpolation=InterpolationMode.BICUBIC, antialias=True)
        ref = (ref.flip(-1) if f else ref).clamp(0, 255)
        torch.testing.assert_close(out[b], ref, atol=2e-3, rtol=0)


def test_loop_and_matmul_agree_and_lists_of_sizes_work():
    sizes = [(40, 60), (64, 48), (33, 33), (50, 90)]
    imgs = [smooth_images(1, h, w, seed=i)[0] for i, (h, w) in enumerate(sizes)]
    a = GpuAugment(32, MEAN, STD, method="matmul")(imgs, torch.Generator().manual_seed(1))
    b = GpuAugment(32, MEAN, STD, method="loop")(imgs, torch.Generator().manual_seed(1))
    assert a.shape == b.shape == (4, 3, 32, 32)
    # The loop rounds to uint8 twice (like PIL): within ~1.5 levels of 255 on smooth images.
    assert (a - b).abs().max().item() * min(STD) * 255 < 1.6


def test_crops_and_flips_vary_with_the_generator_and_repeat_with_the_seed():
    imgs = smooth_images(8, 64, 80)
    aug = GpuAugment(32, MEAN, STD)
    a = aug(imgs, torch.Generator().manual_seed(0))
    b = aug(imgs, torch.Generator().manual_seed(0))
    c = aug(imgs, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)
    boxes, flips = aug.sample_params(torch.tensor([[64, 80]] * 200), torch.Generator().manual_seed(2))
    assert len({tuple(r) for r in boxes.tolist()}) > 150
    assert 60 < int(flips.sum()) < 140


def test_flip_mirrors_the_crop():
    imgs = smooth_images(1, 30, 30).expand(64, -1, -1, -1).contiguous()
    aug = GpuAugment(30, (0, 0, 0), (1, 1, 1), scale=(1.0, 1.0), ratio=(1.0, 1.0), method="matmul")
    out = aug(imgs, torch.Generator().manual_seed(0))  # full-image crop: only the flip varies
    _, flips = aug.sample_params(torch.tensor([[30, 30]] * 64), torch.Generator().manual_seed(0))
    plain, mirrored = out[~flips][0], out[flips][0]
    torch.testing.assert_close(mirrored, plain.flip(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(plain * 255, imgs[0].float(), atol=1e-3, rtol=0)  # 30 -> 30 is the identity


def test_rejects_bad_inputs():
    aug = GpuAugment(16, MEAN, STD)
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.rand(2, 3, 20, 20))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        aug(torch.zeros(2, 1, 20, 20, dtype=torch.uint8))
    with pytest.raises(ValueError, match="method"):
        GpuAugment(16, MEAN, STD, method="fast")


@pytest.mark.gpu
def test_matmul_on_cuda_matches_cpu():
    imgs = smooth_images(8, 70, 90)
    aug = GpuAugment(48, MEAN, STD, method="matmul")
    cpu = aug(imgs, torch.Generator().manual_seed(3))
    gpu = aug.cuda()(imgs.cuda(), torch.Generator().manual_seed(3))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-2, rtol=0)  # TF32 matmuls allowed
