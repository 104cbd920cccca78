"""Every documented layout read from a fake tree, and the errors a user can act on."""
import json
import os
import re

import pytest

from fake_trees import (CLASSNAMES, FGVC_VARIANTS, IMAGENET_WNIDS, SPLIT_FILE_DATASETS, write_classnames,
                        write_fgvc, write_image, write_imagenet, write_imagenet_variants, write_split_file_dataset)
from fastprompt.data import DATASETS, DatasetError, load_dataset


def test_registry_lists_every_documented_dataset():
    from fastprompt.world.catalog import dataset_names

    world = {name for name in DATASETS if name.startswith("world_")}
    assert set(DATASETS) - world == {
        "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
        "sun397", "dtd", "eurosat", "ucf101", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r",
        "imagefolder",
    }
    assert world == set(dataset_names()) and len(world) == 5 * 6  # the rendered world: tasks x domains


@pytest.mark.parametrize("name", sorted(SPLIT_FILE_DATASETS))
def test_split_file_layouts(tmp_path, name):
    content = write_split_file_dataset(tmp_path, name)
    ds = load_dataset(name, tmp_path)
    assert ds.name == name and ds.classnames == CLASSNAMES and ds.class_indices is None
    folder, image_dir, _ = SPLIT_FILE_DATASETS[name]
    base = tmp_path / folder / image_dir if image_dir else tmp_path / folder
    for split in ("train", "val", "test"):
        got = getattr(ds, split)
        assert [(s.path, s.label, s.classname) for s in got] == [
            (os.path.join(os.path.abspath(base), rel), label, cname) for rel, label, cname in content[split]
        ]
        assert all(os.path.isabs(s.path) and os.path.isfile(s.path) for s in got)
    if name == "stanford_cars":
        assert "/stanford_cars/cars_train/" in ds.train[0].path


def test_root_may_be_the_dataset_folder(tmp_path):
    write_split_file_dataset(tmp_path, "dtd")
    assert len(load_dataset("dtd", tmp_path / "dtd").train) == len(load_dataset("dtd", tmp_path).train)


def test_fgvc_aircraft(tmp_path):
    write_fgvc(tmp_path)
    ds = load_dataset("fgvc_aircraft", tmp_path)
    assert ds.classnames == FGVC_VARIANTS  # variants.txt order, names with spaces and slashes intact
    assert (len(ds.train), len(ds.val), len(ds.test)) == (20, 8, 8)
    assert ds.train[0].path.endswith("fgvc_aircraft/images/1000000.jpg")
    assert {s.classname for s in ds.train if s.label == 2} == {"Boeing 717"}


def test_imagenet(tmp_path):
    write_imagenet(tmp_path)
    ds = load_dataset("imagenet", tmp_path)
    assert ds.classnames == list(IMAGENET_WNIDS.values())
    assert len(ds.train) == 24 and len(ds.val) == 12 and ds.test == ds.val  # test = val, as in CoOp
    assert [s.label for s in ds.train] == sorted(s.label for s in ds.train)
    wnids = list(IMAGENET_WNIDS)
    assert all(f"/{wnids[s.label]}/" in s.path and s.classname == ds.classnames[s.label] for s in ds.train)


def test_imagenet_variants(tmp_path):
    write_imagenet_variants(tmp_path)
    names = list(IMAGENET_WNIDS.values())
    v2 = load_dataset("imagenet_v2", tmp_path)
    assert v2.classnames == names and not v2.train and not v2.val
    assert [s.label for s in v2.test] == list(range(6)) and v2.test[3].path.endswith("format-val/3/a.jpeg")
    sketch = load_dataset("imagenet_sketch", tmp_path)
    assert sketch.classnames == names and len(sketch.test) == 12
    for name in ("imagenet_a", "imagenet_r"):
        ds = load_dataset(name, tmp_path)
        assert ds.class_indices == [1, 3, 5]  # positions of the subset's wnids among all classes
        assert ds.classnames == ["goldfish", "tiger shark", "electric ray"]
        assert sorted({s.label for s in ds.test}) == [0, 1, 2] and len(ds.test) == 9
        assert all(ds.classnames[s.label] == s.classname for s in ds.test)


def test_variant_prefers_its_own_classnames_file(tmp_path):
    write_imagenet_variants(tmp_path)
    renamed = {w: n.upper() for w, n in IMAGENET_WNIDS.items()}
    write_classnames(tmp_path / "imagenet-sketch" / "classnames.txt", renamed)
    assert load_dataset("imagenet_sketch", tmp_path).classnames[0] == "TENCH"


def test_imagefolder_with_splits(tmp_path):
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        for c in ("golden_retriever", "tabby_cat"):
            for k in range(n):
                write_image(tmp_path / "pets" / split / c / f"{k}.png", seed=k)
    ds = load_dataset("imagefolder", tmp_path / "pets")
    assert ds.name == "pets" and ds.classnames == ["golden retriever", "tabby cat"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 2, 4)
    assert ds.test[2].label == 1 and ds.test[2].classname == "tabby cat"


def test_imagefolder_flat_split_is_deterministic_and_disjoint(tmp_path):
    for c in ("ants", "bees"):
        for k in range(10):
            write_image(tmp_path / "bugs" / c / f"{k}.png", seed=k)
    a = load_dataset("imagefolder", tmp_path / "bugs")
    b = load_dataset("imagefolder", tmp_path / "bugs")
    assert a == b
    assert (len(a.train), len(a.val), len(a.test)) == (14, 2, 4)
    paths = [s.path for s in a.train + a.val + a.test]
    assert len(set(paths)) == 20


# ---------------------------------------------------------------- errors a user can act on

def test_missing_dataset_folder_shows_expected_tree(tmp_path):
    with pytest.raises(DatasetError, match=r"caltech-101.*does not exist(.|\n)*split_zhou_Caltech101\.json"):
        load_dataset("caltech101", tmp_path)


def test_missing_data_root(tmp_path):
    with pytest.raises(DatasetError, match="data root .*nowhere.* does not exist"):
        load_dataset("dtd", tmp_path / "nowhere")


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'cifar'.*caltech101"):
        load_dataset("cifar", tmp_path)


def test_missing_split_file(tmp_path):
    write_split_file_dataset(tmp_path, "eurosat")
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").unlink()
    with pytest.raises(DatasetError, match=r"split file .*split_zhou_EuroSAT\.json' does not exist(.|\n)*2750/"):
        load_dataset("eurosat", tmp_path)


def test_missing_image_folder(tmp_path):
    write_split_file_dataset(tmp_path, "oxford_flowers")
    (tmp_path / "oxford_flowers" / "jpg").rename(tmp_path / "oxford_flowers" / "images")
    with pytest.raises(DatasetError, match=r"image folder .*oxford_flowers/jpg' does not exist"):
        load_dataset("oxford_flowers", tmp_path)


def test_wrong_relpath_base_names_first_missing_image(tmp_path):
    content = write_split_file_dataset(tmp_path, "food101")
    content["train"][0][0] = "elsewhere/x.jpg"
    (tmp_path / "food-101" / "split_zhou_Food101.json").write_text(json.dumps(content))
    with pytest.raises(DatasetError, match=r"elsewhere/x\.jpg.*first row of 'train'"):
        load_dataset("food101", tmp_path)


@pytest.mark.parametrize("bad_row, message", [
    (["a.jpg", "0", "forest"], r"row 0 of 'val'.*expected \[relpath"),
    (["a.jpg", 0], r"row 0 of 'val'"),
    ("a.jpg", r"row 0 of 'val'"),
    (["a.jpg", -1, "forest"], r"row 0 of 'val'"),
])
def test_malformed_rows(tmp_path, bad_row, message):
    content = write_split_file_dataset(tmp_path, "dtd")
    content["val"][0] = bad_row
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(content))
    with pytest.raises(DatasetError, match=message):
        load_dataset("dtd", tmp_path)


def test_invalid_json_and_missing_keys(tmp_path):
    write_split_file_dataset(tmp_path, "dtd")
    path = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="is not valid JSON"):
        load_dataset("dtd", tmp_path)
    path.write_text(json.dumps({"train": [], "test": []}))
    with pytest.raises(DatasetError, match=re.escape("keys 'train', 'val', 'test' (found ['test', 'train'])")):
        load_dataset("dtd", tmp_path)


def test_label_with_two_names(tmp_path):
    content = write_split_file_dataset(tmp_path, "dtd")
    content["test"][0][2] = "not forest"
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(content))
    with pytest.raises(DatasetError, match="label 0 is named both 'annual crop land' and 'not forest'"):
        load_dataset("dtd", tmp_path)


def test_label_gap_and_empty_class(tmp_path):
    content = write_split_file_dataset(tmp_path, "dtd")
    path = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    gap = {k: [r for r in rows if r[1] != 2] for k, rows in content.items()}
    path.write_text(json.dumps(gap))
    with pytest.raises(DatasetError, match=r"missing labels \[2\]"):
        load_dataset("dtd", tmp_path)
    no_train = dict(content, train=[r for r in content["train"] if r[1] != 4])
    path.write_text(json.dumps(no_train))
    with pytest.raises(DatasetError, match=r"no training image: \['industrial buildings'\]"):
        load_dataset("dtd", tmp_path)


def test_fgvc_errors(tmp_path):
    write_fgvc(tmp_path)
    ds = tmp_path / "fgvc_aircraft"
    (ds / "images_variant_val.txt").write_text("1000000 Concorde\n")
    with pytest.raises(DatasetError, match="line 1: variant 'Concorde' is not in"):
        load_dataset("fgvc_aircraft", tmp_path)
    (ds / "images_variant_val.txt").write_text("justanid\n")
    with pytest.raises(DatasetError, match="expected \"<image_id> <variant name>\""):
        load_dataset("fgvc_aircraft", tmp_path)
    (ds / "images_variant_val.txt").unlink()
    with pytest.raises(DatasetError, match=r"images_variant_val\.txt' does not exist(.|\n)*variants\.txt"):
        load_dataset("fgvc_aircraft", tmp_path)


def test_imagenet_flat_val_folder_explains_wnid_folders(tmp_path):
    write_imagenet(tmp_path)
    val = tmp_path / "imagenet" / "images" / "val"
    for w in IMAGENET_WNIDS:
        for f in (val / w).iterdir():
            f.rename(val / f"{w}_{f.name}")
        (val / w).rmdir()
    with pytest.raises(DatasetError, match="holds images directly; they must be sorted into one folder per wnid"):
        load_dataset("imagenet", tmp_path)


def test_imagenet_missing_class_folder_and_empty_class(tmp_path):
    write_imagenet(tmp_path)
    train = tmp_path / "imagenet" / "images" / "train" / "n01440764"
    for f in train.iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"class folder .*n01440764' holds no images"):
        load_dataset("imagenet", tmp_path)
    train.rmdir()
    with pytest.raises(DatasetError, match=r"no folder for 1 classes.*n01440764"):
        load_dataset("imagenet", tmp_path)


def test_imagenet_missing_classnames(tmp_path):
    write_imagenet(tmp_path)
    (tmp_path / "imagenet" / "classnames.txt").unlink()
    with pytest.raises(DatasetError, match=r"classnames\.txt' does not exist(.|\n)*<wnid> <class name>"):
        load_dataset("imagenet", tmp_path)


def test_variant_without_classnames(tmp_path):
    write_imagenet_variants(tmp_path)
    (tmp_path / "imagenet" / "classnames.txt").unlink()
    with pytest.raises(DatasetError, match=r"imagenet_r needs ImageNet's classnames\.txt"):
        load_dataset("imagenet_r", tmp_path)


def test_variant_with_unknown_wnid(tmp_path):
    write_imagenet_variants(tmp_path)
    write_image(tmp_path / "imagenet-adversarial" / "imagenet-a" / "n99999999" / "x.jpg")
    with pytest.raises(DatasetError, match=r"folders \['n99999999'\] are not wnids"):
        load_dataset("imagenet_a", tmp_path)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"neither train/ nor class folders(.|\n)*train/<class name>"):
        (tmp_path / "empty").mkdir()
        load_dataset("imagefolder", tmp_path / "empty")
    write_image(tmp_path / "own" / "train" / "cat" / "0.png")
    (tmp_path / "own" / "train" / "dog").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*train/dog' holds no images"):
        load_dataset("imagefolder", tmp_path / "own")
    write_image(tmp_path / "own" / "train" / "dog" / "0.png")
    write_image(tmp_path / "own" / "test" / "bird" / "0.png")
    with pytest.raises(DatasetError, match=r"test folder .*has class folders \['bird'\] that train/ lacks"):
        load_dataset("imagefolder", tmp_path / "own")


def test_imagefolder_classes_txt_sets_label_order(tmp_path):
    for c in ("zebra", "ant", "moose"):
        write_image(tmp_path / "own" / "train" / c / "0.png")
        write_image(tmp_path / "own" / "test" / c / "0.png")
    (tmp_path / "own" / "classes.txt").write_text("zebra\nant\nmoose\n")
    ds = load_dataset("imagefolder", tmp_path / "own")
    assert ds.classnames == ["zebra", "ant", "moose"]
    assert [(s.path.split("/")[-2], s.label) for s in ds.test] == [("zebra", 0), ("ant", 1), ("moose", 2)]
    (tmp_path / "own" / "classes.txt").write_text("zebra\nant\n")
    with pytest.raises(DatasetError, match=r"classes\.txt' must list each class folder exactly once"):
        load_dataset("imagefolder", tmp_path / "own")
