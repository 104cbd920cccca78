"""Few-shot sampling per (dataset, shots, seed), its cache, and the base/new class split."""
import json
import logging
import os

import pytest

from fastprompt.data import DatasetSplits, Sample, few_shot_split, split_base_new, subset_classes
from fastprompt.data.few_shot import cache_path


def synthetic(n_classes=5, n_train=20, n_val=6, n_test=3, root="/data/x") -> DatasetSplits:
    names = [f"class {c}" for c in range(n_classes)]

    def make(split, n):
        # Interleaved labels, so sampling cannot rely on samples being grouped by class.
        return [Sample(f"{root}/{split}/{k}_{c}.jpg", c, names[c]) for k in range(n) for c in range(n_classes)]

    return DatasetSplits("toy", names, make("train", n_train), make("val", n_val), make("test", n_test))


def counts(samples):
    out = {}
    for s in samples:
        out[s.label] = out.get(s.label, 0) + 1
    return out


def test_shots_per_class_and_val_capped_at_four():
    ds = synthetic()
    fs = few_shot_split(ds, shots=8, seed=1, cache_dir=None)
    assert counts(fs.train) == {c: 8 for c in range(5)}
    assert counts(fs.val) == {c: 4 for c in range(5)}  # min(shots, 4)
    assert fs.test == ds.test and fs.classnames == ds.classnames
    assert set(fs.train) <= set(ds.train) and len(set(fs.train)) == len(fs.train)
    fs2 = few_shot_split(ds, shots=2, seed=1, cache_dir=None)
    assert counts(fs2.val) == {c: 2 for c in range(5)}


def test_small_classes_keep_all_their_images():
    ds = synthetic(n_train=3)
    fs = few_shot_split(ds, shots=16, seed=1, cache_dir=None)
    assert sorted(fs.train, key=lambda s: s.path) == sorted(ds.train, key=lambda s: s.path)


def test_deterministic_per_seed_and_different_across_seeds():
    ds = synthetic()
    a = few_shot_split(ds, 4, seed=1, cache_dir=None)
    b = few_shot_split(synthetic(), 4, seed=1, cache_dir=None)
    c = few_shot_split(ds, 4, seed=2, cache_dir=None)
    assert a.train == b.train and a.val == b.val
    assert a.train != c.train


def test_uses_no_global_random_state():
    import random

    ds = synthetic()
    random.seed(123)
    a = few_shot_split(ds, 4, seed=1, cache_dir=None)
    random.seed(999)
    b = few_shot_split(ds, 4, seed=1, cache_dir=None)
    assert a.train == b.train


def test_cache_is_written_and_reused(tmp_path):
    ds = synthetic()
    first = few_shot_split(ds, 4, seed=3, cache_dir=tmp_path)
    path = cache_path(tmp_path, "toy", 4, 3)
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left
    data = json.loads(path.read_text())
    assert data["train_paths"] == [s.path for s in first.train]
    # Edit the cached choice: a rerun must take it from the cache, not resample.
    data["train"] = data["train"][:1]
    path.write_text(json.dumps(data))
    again = few_shot_split(ds, 4, seed=3, cache_dir=tmp_path)
    assert again.train == [ds.train[data["train"][0]]]


def test_cache_survives_moving_the_data_root(tmp_path):
    first = few_shot_split(synthetic(root="/old/place"), 4, seed=3, cache_dir=tmp_path)
    moved = few_shot_split(synthetic(root="/new/place"), 4, seed=3, cache_dir=tmp_path)
    assert [s.path.replace("/old/", "/new/") for s in first.train] == [s.path for s in moved.train]


def test_stale_or_broken_cache_is_resampled_with_a_warning(tmp_path, caplog):
    ds = synthetic()
    few_shot_split(ds, 4, seed=3, cache_dir=tmp_path)
    path = cache_path(tmp_path, "toy", 4, 3)
    changed = synthetic(n_train=21)
    with caplog.at_level(logging.WARNING, logger="fastprompt.data.few_shot"):
        fs = few_shot_split(changed, 4, seed=3, cache_dir=tmp_path)
    assert "fingerprint mismatch" in caplog.text
    assert fs.train == few_shot_split(changed, 4, seed=3, cache_dir=None).train
    path.write_text("{truncated")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastprompt.data.few_shot"):
        fs = few_shot_split(ds, 4, seed=3, cache_dir=tmp_path)
    assert "unreadable" in caplog.text
    assert fs.train == few_shot_split(ds, 4, seed=3, cache_dir=None).train
    assert json.loads(path.read_text())["shots"] == 4  # rewritten whole


def test_rejects_bad_shots():
    with pytest.raises(ValueError, match="shots must be a positive integer"):
        few_shot_split(synthetic(), 0, seed=1, cache_dir=None)


@pytest.mark.parametrize("n_classes, n_base", [(5, 3), (6, 3), (2, 1), (397, 199)])
def test_base_new_split_halves_and_relabels(n_classes, n_base):
    ds = synthetic(n_classes=n_classes, n_train=2, n_val=1, n_test=1)
    base, new = split_base_new(ds)
    assert base.classnames == ds.classnames[:n_base] and new.classnames == ds.classnames[n_base:]
    assert base.class_indices == list(range(n_base)) and new.class_indices == list(range(n_base, n_classes))
    for part, offset in ((base, 0), (new, n_base)):
        for split in ("train", "val", "test"):
            samples = getattr(part, split)
            assert {s.label for s in samples} == set(range(part.num_classes))
            assert all(s.classname == part.classnames[s.label] == ds.classnames[s.label + offset] for s in samples)
    for split in ("train", "val", "test"):
        b, n = {s.path for s in getattr(base, split)}, {s.path for s in getattr(new, split)}
        assert not b & n and len(b | n) == len(getattr(ds, split))


def test_few_shot_before_base_new_keeps_the_sample():
    ds = synthetic(n_classes=7)
    fs = few_shot_split(ds, 4, seed=1, cache_dir=None)
    base, new = split_base_new(fs)
    assert {s.path for s in base.train} | {s.path for s in new.train} == {s.path for s in fs.train}
    assert len(base.train) == 4 * 4 and len(new.train) == 3 * 4


def test_subset_classes_reorders_and_composes_indices():
    ds = synthetic(n_classes=6, n_train=1, n_val=0, n_test=0)
    sub = subset_classes(ds, [4, 1])
    assert sub.classnames == ["class 4", "class 1"] and sub.class_indices == [4, 1]
    assert {(os.path.basename(s.path), s.label) for s in sub.train} == {("0_4.jpg", 0), ("0_1.jpg", 1)}
    nested = subset_classes(sub, [1])
    assert nested.class_indices == [1] and nested.classnames == ["class 1"]
    with pytest.raises(ValueError, match="out of range"):
        subset_classes(ds, [6])
    with pytest.raises(ValueError, match="duplicates"):
        subset_classes(ds, [1, 1])
