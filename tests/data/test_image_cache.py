"""The decoded training-image cache: sizes, labels, batching, corrupt files, threads."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from fake_trees import write_corrupt, write_image
from fastprompt.data import DatasetError, Sample, TrainImageCache


def samples_of(paths, labels=None):
    return [Sample(str(p), lab, f"c{lab}") for p, lab in zip(paths, labels or range(len(paths)))]


def test_shrinks_to_short_side_keeping_aspect_and_never_upsamples(tmp_path):
    big = write_image(tmp_path / "big.png", size=(60, 40))
    tall = write_image(tmp_path / "tall.png", size=(30, 90))
    small = write_image(tmp_path / "small.jpg", size=(10, 12))
    cache = TrainImageCache(samples_of([big, tall, small]), short_side=20)
    assert [tuple(t.shape) for t in cache.images] == [(3, 20, 30), (3, 60, 20), (3, 12, 10)]
    assert all(t.dtype == torch.uint8 for t in cache.images)
    assert cache.labels.tolist() == [0, 1, 2] and cache.labels.dtype == torch.int64
    # Untouched image: exactly the decoded pixels.
    ref = torch.from_numpy(np.array(Image.open(small).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(cache.images[2], ref)
    imgs, labels = cache.batch(torch.tensor([2, 0]))
    assert isinstance(imgs, list) and [tuple(t.shape) for t in imgs] == [(3, 12, 10), (3, 20, 30)]
    assert labels.tolist() == [2, 0]


def test_equal_sizes_are_stacked_and_batched_as_one_tensor(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", size=(16, 16), seed=i) for i in range(5)]
    cache = TrainImageCache(samples_of(paths, [0, 0, 1, 1, 2]), short_side=8, num_workers=3)
    assert isinstance(cache.images, torch.Tensor) and cache.images.shape == (5, 3, 8, 8)
    assert len(cache) == 5 and cache.nbytes == 5 * 3 * 8 * 8
    imgs, labels = cache.batch(torch.tensor([4, 1, 1]))
    assert imgs.shape == (3, 3, 8, 8) and torch.equal(imgs[1], cache.images[1]) and labels.tolist() == [2, 0, 0]


def test_threaded_decode_matches_serial(tmp_path):
    paths = [write_image(tmp_path / f"{i}.jpg", size=(20 + i, 17), seed=i) for i in range(8)]
    serial = TrainImageCache(samples_of(paths), short_side=12)
    threaded = TrainImageCache(samples_of(paths), short_side=12, num_workers=4)
    assert all(torch.equal(a, b) for a, b in zip(serial.images, threaded.images))


def test_corrupt_image_raises_naming_the_file(tmp_path):
    good = write_image(tmp_path / "good.png")
    bad = write_corrupt(tmp_path / "bad.jpg")
    with pytest.raises(DatasetError, match=r"cannot decode image .*bad\.jpg"):
        TrainImageCache(samples_of([good, bad]), short_side=8)
    with pytest.raises(DatasetError, match=r"image file .*gone\.png' does not exist"):
        TrainImageCache(samples_of([good, tmp_path / "gone.png"]), short_side=8)


def test_allow_corrupt_skips_and_counts(tmp_path, caplog):
    good = write_image(tmp_path / "good.png")
    bad = write_corrupt(tmp_path / "bad.jpg")
    with caplog.at_level(logging.WARNING, logger="fastprompt.data.image_cache"):
        cache = TrainImageCache(samples_of([bad, good, tmp_path / "gone.png"], [0, 1, 2]), short_side=8,
                                allow_corrupt=True, num_workers=2)
    assert len(cache) == 1 and cache.labels.tolist() == [1]
    assert cache.skipped == [str(bad), str(tmp_path / "gone.png")]
    assert "skipped 2 corrupt or unreadable training images" in caplog.text
    with pytest.raises(DatasetError, match="all 1 training images were unreadable"):
        TrainImageCache(samples_of([bad]), short_side=8, allow_corrupt=True)


def test_greyscale_and_palette_images_become_rgb(tmp_path):
    Image.new("L", (9, 7), 200).save(tmp_path / "grey.png")
    Image.new("P", (9, 7), 3).save(tmp_path / "pal.gif")
    cache = TrainImageCache(samples_of([tmp_path / "grey.png", tmp_path / "pal.gif"]), short_side=64)
    assert cache.images.shape == (2, 3, 7, 9)
    assert int(cache.images[0].min()) == 200 == int(cache.images[0].max())


@pytest.mark.gpu
@pytest.mark.parametrize("where", ["cuda", "pinned", "over_budget"])
def test_cache_on_gpu_or_pinned_cpu(tmp_path, where):
    paths = [write_image(tmp_path / f"{i}.png", size=(16, 12 + i % 2), seed=i) for i in range(6)]
    kwargs = {"cuda": {"device": "cuda"}, "pinned": {"pin_memory": True},
              "over_budget": {"device": "cuda", "max_device_bytes": 100}}[where]
    cache = TrainImageCache(samples_of(paths), short_side=64, **kwargs)
    ref = TrainImageCache(samples_of(paths), short_side=64)
    imgs, labels = cache.batch(torch.tensor([5, 0]), device="cuda")
    assert labels.device.type == "cuda" and labels.tolist() == [5, 0]
    assert all(t.device.type == "cuda" and torch.equal(t.cpu(), ref.images[i]) for t, i in zip(imgs, [5, 0]))
    if where == "over_budget":  # too large for the device budget: kept in pinned host memory
        assert all(t.device.type == "cpu" and t.is_pinned() for t in cache.images)
        assert cache.batch(torch.tensor([1]))[0][0].device.type == "cuda"  # still delivered to the device
