"""Evaluation preprocessing (open_clip's) and the streaming loader."""
import logging

import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image

from fake_trees import write_corrupt, write_image
from fastprompt.data import DatasetError, Sample, eval_loader, eval_transform

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def test_eval_transform_matches_open_clip_val_transform(tmp_path):
    ours = eval_transform(24, MEAN, STD)
    theirs = image_transform(24, is_train=False, mean=MEAN, std=STD)
    for size in ((50, 31), (31, 50), (24, 24), (10, 13)):
        img = Image.open(write_image(tmp_path / f"{size}.png", size=size, seed=sum(size)))
        a, b = ours(img), theirs(img)
        assert a.shape == (3, 24, 24) and a.dtype == torch.float32
        torch.testing.assert_close(a, b)


def loader_samples(tmp_path, n=7):
    return [Sample(str(write_image(tmp_path / f"{i}.jpg", size=(20 + i, 16), seed=i)), i % 3, f"c{i % 3}")
            for i in range(n)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_yields_batches_in_order(tmp_path, num_workers):
    samples = loader_samples(tmp_path)
    loader = eval_loader(samples, image_size=16, mean=MEAN, std=STD, batch_size=3, num_workers=num_workers)
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(3, 3, 16, 16), (3, 3, 16, 16), (1, 3, 16, 16)]
    labels = torch.cat([b[1] for b in batches])
    assert labels.dtype == torch.int64 and labels.tolist() == [s.label for s in samples]
    first = eval_transform(16, MEAN, STD)(Image.open(samples[0].path))
    torch.testing.assert_close(batches[0][0][0], first)


def test_corrupt_image_error_names_the_file(tmp_path):
    samples = loader_samples(tmp_path, 3) + [Sample(str(write_corrupt(tmp_path / "broken.jpg")), 0, "c0")]
    loader = eval_loader(samples, image_size=16, mean=MEAN, std=STD, batch_size=2)
    with pytest.raises(DatasetError, match=r"broken\.jpg"):
        list(loader)


def test_allow_corrupt_skips_counts_and_warns(tmp_path, caplog):
    bad = [Sample(str(write_corrupt(tmp_path / f"broken{i}.jpg")), 1, "c1") for i in range(2)]
    samples = loader_samples(tmp_path, 3) + bad + [Sample(str(tmp_path / "missing.png"), 2, "c2")]
    loader = eval_loader(samples, image_size=16, mean=MEAN, std=STD, batch_size=2, allow_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="fastprompt.data.eval_loader"):
        batches = list(loader)
    assert sum(len(b[1]) for b in batches) == 3
    assert len(batches) == 2  # the batch of two broken files is dropped, not yielded empty
    assert loader.skipped == [s.path for s in samples[3:]]
    assert "skipped 3 corrupt or unreadable evaluation images" in caplog.text


def test_empty_split_is_an_error():
    with pytest.raises(DatasetError, match="no samples"):
        eval_loader([], image_size=16, mean=MEAN, std=STD, batch_size=2)
