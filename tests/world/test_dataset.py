"""The world as a dataset: registry names, rendering once, tasks' base/new splits, ImageFolder export."""
import os
import time

import pytest

from fastprompt.data import DatasetError, load_dataset, split_base_new
from fastprompt.world.baselines import baselines
from fastprompt.world.dataset import IMAGES_PER_PAIR, MARKER, export_imagefolder, render_domain
from fastprompt.world.tasks import TASKS
from fastprompt.world.vocabulary import HELD_OUT_PAIRS, SHAPES, class_name


def test_by_shape_splits_base_and_new_by_shape(world_root):
    splits = load_dataset("world_by_shape", world_root)
    assert splits.name == "world_by_shape" and splits.num_classes == 64
    assert [len(getattr(splits, s)) for s in ("train", "val", "test")] == [64 * n for n in IMAGES_PER_PAIR.values()]
    base, new = split_base_new(splits)
    assert {n.split()[1] for n in base.classnames} == set(SHAPES[:4])
    assert {n.split()[1] for n in new.classnames} == set(SHAPES[4:])
    assert all(os.path.basename(os.path.dirname(s.path)) == s.classname.replace(" ", "_") for s in new.test)


def test_novel_task_tests_the_pairs_pretraining_never_showed(world_root):
    base, new = split_base_new(load_dataset("world_novel", world_root))
    held = {class_name(c, s) for c, s in HELD_OUT_PAIRS}
    assert set(new.classnames) == held and not held & set(base.classnames)


def test_a_rendered_domain_is_reused_and_a_foreign_folder_refused(world_root, tmp_path):
    start = time.perf_counter()
    assert render_domain(world_root / "world", "clean") == world_root / "world" / "clean"
    assert time.perf_counter() - start < 1.0  # the marker matches: nothing rendered again
    (tmp_path / "world" / "clutter").mkdir(parents=True)
    (tmp_path / "world" / "clutter" / "mine.txt").write_text("x")
    with pytest.raises(DatasetError, match="not rendered by fastprompt"):
        load_dataset("world_shapes_clutter", tmp_path)
    assert (world_root / "world" / "clean" / MARKER).is_file()


def test_export_gives_the_same_classes_to_imagefolder(world_root, tmp_path):
    out = export_imagefolder(tmp_path / "shapes", "shapes", world_dir=world_root / "world")
    again = load_dataset("imagefolder", out)
    world = load_dataset("world_shapes", world_root)
    assert again.classnames == world.classnames == list(SHAPES)
    for split in ("train", "val", "test"):
        assert [s.label for s in getattr(again, split)] == [s.label for s in getattr(world, split)]
    with pytest.raises(DatasetError, match="exists"):
        export_imagefolder(out, "shapes")


def test_baselines_are_the_expected_fractions():
    b = baselines(TASKS["by_shape"])
    assert b["chance"]["base"] == pytest.approx(100 / 32) and b["colour only"]["new"] == pytest.approx(25.0)
    assert b["shape only"]["new"] == pytest.approx(12.5)
    assert baselines(TASKS["novel"])["colour only"]["new"] == pytest.approx(50.0)
    assert baselines(TASKS["shapes"])["shape only"]["base"] == pytest.approx(100.0)
    assert baselines(TASKS["shapes"])["colour only"]["base"] == pytest.approx(25.0)
