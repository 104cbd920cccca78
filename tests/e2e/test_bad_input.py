"""Bad input wherever a user gives it: each is refused with one line that names the bad thing and
the fix (exit code 2, no traceback), and nothing already written is lost."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastprompt.cli import main
from tiny_runs import CONFIG, REPO, TINY, cli_error as _error, snapshot as _snapshot


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.device=tpu", "train.device: 'tpu' is not a device; use auto, cpu, cuda or cuda:N"),
        ("train.device=cuda:0", "no CUDA device is visible; use train.device=cpu"),
        ("train.precision=fp8", "train.precision: expected one of 'fp32' | 'bf16' | 'fp16', got 'fp8'"),
        ("model.pretrained=/no/such/weights.pt", "checkpoint file '/no/such/weights.pt'"),
        ("method.options.n_ctx=abc", "method.options.n_ctx: expected int, got 'abc'"),
        ("optim.name=adamm", "did you mean 'adam'?"),
        ("data.dataset=caltech", "unknown dataset 'caltech'; known: caltech101"),
    ],
)
def test_bad_config_values(override, message, tmp_path, digits_root, capsys):
    if override.startswith("train.device=cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    err = _error(capsys, ["train", CONFIG, *TINY, f"data.root={digits_root}", override, f"output_dir={tmp_path}/r"])
    assert message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the Triton kernels run natively")
def test_a_triton_backend_that_cannot_run_here_is_refused_before_training(tmp_path, digits_root):
    # Without TRITON_INTERPRET (which the test session sets) the kernels cannot run on the CPU: the
    # config is refused up front with one line, as a config error, not a traceback from the forward.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-m", "fastprompt", "train", CONFIG, *TINY, f"data.root={digits_root}",
                           "method.options.attention_backend=triton", f"output_dir={out}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "method.options.attention_backend=triton runs Triton kernels" in proc.stderr
    assert "method.options.attention_backend=auto and head_backend=auto" in proc.stderr
    assert not list(out.rglob("train.log"))


def test_output_dir_that_is_a_file(tmp_path, digits_root, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    err = _error(capsys, ["train", CONFIG, *TINY, f"data.root={digits_root}", f"output_dir={target}"])
    assert f"output_dir: {target} exists and is not a folder" in err
    assert target.read_text() == "mine"


def test_train_refuses_to_replace_an_earlier_run(tmp_path, digits_root, capsys):
    out = tmp_path / "run"
    argv = ["train", CONFIG, *TINY, f"data.root={digits_root}", f"output_dir={out}"]
    assert main(argv) == 0
    capsys.readouterr()
    before = _snapshot(out)
    err = _error(capsys, argv)
    assert f"output_dir {out} already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert _snapshot(out) == before
    assert main([*argv, "--overwrite"]) == 0  # asked for explicitly: trains again


def test_corrupt_training_image_names_the_file_and_the_switch(tmp_path, digits_root, capsys):
    data = tmp_path / "data"
    shutil.copytree(digits_root, data)
    bad = sorted((data / "train" / "zero").iterdir())[0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    argv = ["train", CONFIG, *TINY, f"data.root={data}", "data.shots=1000", f"output_dir={tmp_path / 'r'}"]
    err = _error(capsys, argv)
    assert f"cannot decode image '{bad}'" in err and "data.allow_corrupt=true" in err
    assert main([*argv, "data.allow_corrupt=true"]) == 0  # skipped and counted instead
    assert "skipped 1 unreadable training images" in (tmp_path / "r" / "seed1" / "train.log").read_text()


@pytest.mark.parametrize("test_classes", ["none", "base only"])
def test_missing_test_images_are_refused_before_training(test_classes, tmp_path, digits_root, capsys):
    data = tmp_path / "data"
    shutil.copytree(digits_root / "train", data / "train")
    message = f"no test images for imagefolder: nothing found in {data / 'test'}/"
    if test_classes == "base only":  # base = the first half of the sorted class folders
        classes = sorted(p.name for p in (digits_root / "test").iterdir())
        for name in classes[:5]:
            shutil.copytree(digits_root / "test" / name, data / "test" / name)
        message = f"no test images for the new classes of imagefolder: nothing found in {data / 'test'}/"
    out = tmp_path / "r"
    err = _error(capsys, ["train", CONFIG, *TINY, f"data.root={data}", f"output_dir={out}"])
    assert message in err and "flat layout" in err
    assert not list(out.rglob("train.log"))  # refused before any training


def test_unreadable_test_images_name_the_folder_and_the_switch(tmp_path, digits_root, capsys):
    data = tmp_path / "data"
    shutil.copytree(digits_root, data)
    for image in (data / "test").rglob("*.png"):
        image.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for cache in ("true", "false"):
        err = _error(capsys, ["train", CONFIG, *TINY, f"data.root={data}", "data.allow_corrupt=true",
                              f"train.feature_cache={cache}", f"output_dir={tmp_path / cache}"])
        assert "test images under" in err and "data.allow_corrupt=true skipped them all" in err


def _split_dataset(tmp_path: Path, digits_root: Path, rows) -> Path:
    root = tmp_path / "data"
    images = root / "dtd" / "images"
    shutil.copytree(digits_root / "train", images)
    (root / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(rows))
    return root


def _rows(digits_root: Path, per_class: int = 3) -> list:
    classes = sorted(p.name for p in (digits_root / "train").iterdir() if p.is_dir())
    rows = []
    for label, name in enumerate(classes):
        for f in sorted((digits_root / "train" / name).iterdir())[:per_class]:
            rows.append([f"{name}/{f.name}", label, name])
    return rows


@pytest.mark.parametrize("damage, message", [
    ("not json", "is not valid JSON"),
    ("no test split", "'test'"),
    ("renamed class", "each label must have exactly one class name"),
    ("missing image", "does not exist"),
])
def test_bad_split_files(damage, message, tmp_path, digits_root, capsys):
    rows = _rows(digits_root)
    split = {"train": rows, "val": rows[:5], "test": rows}
    if damage == "renamed class":
        split["test"] = [[p, label, name.upper() if label == 3 else name] for p, label, name in rows]
    elif damage == "missing image":
        split["test"] = rows + [[f"{rows[0][2]}/not-there.png", rows[0][1], rows[0][2]]]
    elif damage == "no test split":
        del split["test"]
    root = _split_dataset(tmp_path, digits_root, split)
    if damage == "not json":
        (root / "dtd" / "split_zhou_DescribableTextures.json").write_text("{'train': [")
    err = _error(capsys, ["train", CONFIG, *TINY, "data.dataset=dtd", f"data.root={root}", f"output_dir={tmp_path}/r"])
    assert message in err
    assert ("not-there.png" if damage == "missing image" else "split_zhou_DescribableTextures.json") in err
    if damage == "missing image":  # found when the test images are read
        assert "or set data.allow_corrupt=true" in err


def test_report_of_a_damaged_results_json_names_the_file(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{oops")
    err = _error(capsys, ["report", str(tmp_path)])
    assert f"{tmp_path / 'results.json'} is not valid JSON" in err and "fastprompt eval" in err


def test_nothing_in_the_package_unpickles_from_disk():
    # Checkpoints, caches and results are safetensors and JSON; open_clip's own weight loading is
    # outside fastprompt's files. torch.load (even weights_only=True) and pickle readers are banned.
    pattern = re.compile(r"torch\.load\(|pickle\.loads?\(|allow_pickle\s*=\s*True|joblib\.load|np\.load\(")
    offenders = []
    for folder in (REPO / "fastprompt", REPO / "kernels"):
        for path in folder.rglob("*.py"):
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert offenders == []


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(n=st.integers(1, 12), start=st.integers(-3, 15), count=st.integers(-2, 15))
def test_kernel_prompt_ranges_out_of_bounds_are_refused_by_both_paths(n, start, count):
    from fastprompt.kernels import decoupled_attention, reference

    q = torch.randn(1, 1, n, 16)
    ok = count >= 0 and start >= 0 and start + count <= n
    for op in (decoupled_attention, reference.decoupled_attention):
        if ok:
            continue  # valid ranges are the property tests' business (tests/kernels/test_properties.py)
        with pytest.raises(ValueError, match=r"num_prompts must be >= 0|prompt range .* is out of bounds for a "
                                             rf"sequence of N={n} tokens"):
            op(q, q, q, prompt_start=start, num_prompts=count)
