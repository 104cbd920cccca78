"""The demo's real images: scikit-learn digits written as an ImageFolder and read back."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastprompt.data import (DIGIT_NAMES, DatasetError, GpuAugment, TrainImageCache, eval_loader, few_shot_split,
                             load_dataset, split_base_new, write_digits_imagefolder)


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    return write_digits_imagefolder(tmp_path_factory.mktemp("d") / "digits", image_size=16)


def test_round_trip_through_imagefolder(digits_root):
    from sklearn.datasets import load_digits

    ds = load_dataset("imagefolder", digits_root)
    assert ds.classnames == list(DIGIT_NAMES)  # classes.txt keeps label i = digit i
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797
    assert len(ds.test) == len(ds.val) > 300 and len(ds.train) > 1000
    assert len({s.path for s in ds.train} & {s.path for s in ds.test}) == 0
    # A written image is the sklearn digit (upscaled) of the class its folder names.
    s = ds.test[0]
    index = int(s.path.rsplit("/", 1)[1].split(".")[0])
    digits = load_digits()
    assert DIGIT_NAMES[digits.target[index]] == s.classname
    img = np.asarray(Image.open(s.path).resize((8, 8), Image.Resampling.BOX), dtype=np.float64)
    assert np.corrcoef(img.ravel(), digits.images[index].ravel())[0, 1] > 0.9


def test_second_call_is_a_no_op_and_foreign_folders_are_refused(digits_root, tmp_path):
    before = sorted(p.stat().st_mtime_ns for p in digits_root.rglob("*.png"))[:5]
    assert write_digits_imagefolder(digits_root, image_size=16) == digits_root
    assert sorted(p.stat().st_mtime_ns for p in digits_root.rglob("*.png"))[:5] == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not an empty folder"):
        write_digits_imagefolder(tmp_path / "mine")


def test_whole_data_path_on_digits(digits_root, tmp_path):
    ds = load_dataset("imagefolder", digits_root)
    base, new = split_base_new(few_shot_split(ds, shots=4, seed=1, cache_dir=tmp_path))
    assert base.classnames == ["zero", "one", "two", "three", "four"] and len(base.train) == 20
    assert new.classnames == ["five", "six", "seven", "eight", "nine"]
    cache = TrainImageCache(base.train, short_side=224)
    images, labels = cache.batch(torch.randperm(len(cache), generator=torch.Generator().manual_seed(0))[:8])
    x = GpuAugment(16, (0.5,) * 3, (0.5,) * 3)(images, torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 16, 16) and labels.max() < 5
    n = sum(len(y) for _, y in eval_loader(new.test, image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, batch_size=64))
    assert n == len(new.test)
