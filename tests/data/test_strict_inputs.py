"""Data the user would otherwise get silently wrong: class names that collide, 16-bit greyscale
PNGs, hidden folders holding images, classes that a split leaves out."""
import logging

import numpy as np
import pytest
from PIL import Image

from fake_trees import write_image
from fastprompt.data import DatasetError, load_dataset
from fastprompt.data.images import load_rgb
from fastprompt.data.splits import DatasetSplits, Sample, split_base_new


def _tree(root, classes, per_class=3, splits=("train", "test")):
    for split in splits:
        for c in classes:
            for i in range(per_class):
                write_image(root / split / c / f"{i}.png", seed=i)


@pytest.mark.parametrize("layout", ["splits", "flat"])
def test_two_folders_one_class_name_are_refused_naming_both(tmp_path, layout):
    classes = ["hot_dog", "hot dog", "pizza"]
    if layout == "splits":
        _tree(tmp_path, classes)
        parent = tmp_path / "train"
    else:
        for c in classes:
            for i in range(3):
                write_image(tmp_path / c / f"{i}.png", seed=i)
        parent = tmp_path
    with pytest.raises(DatasetError) as err:
        load_dataset("imagefolder", tmp_path)
    message = str(err.value)
    assert str(parent / "hot dog") in message and str(parent / "hot_dog") in message and "'hot dog'" in message


def test_class_names_that_differ_in_case_are_a_warning(tmp_path, caplog):
    _tree(tmp_path, ["cat", "Cat", "dog"])
    with caplog.at_level(logging.WARNING):
        splits = load_dataset("imagefolder", tmp_path)
    assert any("differ only in case" in w for w in splits.warnings)
    assert str(tmp_path / "train" / "cat") in caplog.text and str(tmp_path / "train" / "Cat") in caplog.text


def test_hidden_folders_with_images_are_named(tmp_path):
    _tree(tmp_path, ["apple", "pear"])
    write_image(tmp_path / "train" / "..." / "0.png")
    (tmp_path / "train" / ".git").mkdir()  # a hidden folder without images: no noise
    splits = load_dataset("imagefolder", tmp_path)
    assert splits.classnames == ["apple", "pear"]
    hidden = [w for w in splits.warnings if "hidden" in w]
    assert len(hidden) == 1 and str(tmp_path / "train" / "...") in hidden[0]


def test_a_class_without_test_images_is_a_warning(tmp_path):
    for c, n in (("apple", 5), ("pear", 1)):  # flat layout: one image gives the class no test image
        for i in range(n):
            write_image(tmp_path / c / f"{i}.png", seed=i)
    splits = load_dataset("imagefolder", tmp_path)
    assert any("1 class(es) have no test images ('pear')" in w for w in splits.warnings)


def test_a_single_new_class_is_a_warning():
    samples = [Sample(f"/x/{i}.png", i, c) for i, c in enumerate("abc")]
    base, new = split_base_new(DatasetSplits("toy", list("abc"), samples, [], samples))
    assert new.num_classes == 1 and any("single class" in w for w in new.warnings) and not base.warnings


def test_sixteen_bit_grey_png_keeps_its_grey_levels(tmp_path):
    values = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # really stored as 16-bit
    rgb = np.asarray(load_rgb(str(path)))
    expected = np.rint(values / 257.0).astype(np.uint8)
    assert rgb.shape == (64, 64, 3) and (rgb[..., 0] == expected).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert len(np.unique(rgb)) > 200  # not just 0 and 255


def test_eight_bit_images_decode_as_before(tmp_path):
    path = write_image(tmp_path / "rgb.png", size=(10, 7), seed=3)
    assert np.array_equal(np.asarray(load_rgb(str(path))), np.asarray(Image.open(path).convert("RGB")))
