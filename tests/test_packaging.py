"""A plain `pip install` (a built wheel, no checkout) has every package, the config layers and the
shipped weights: `fastprompt config`, `train --protocol/--method` and `sweep` compose configs
without configs/, and fastprompt-world loads from the installed package."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources, installed (without dependencies) into a folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("fastprompt", "kernels"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("fastprompt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "fastprompt").rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= set(names)  # every package of the tree is listed
    assert "fastprompt/kernels/reference.py" in names
    layers = {str(p.relative_to(REPO)) for p in (REPO / "fastprompt" / "config" / "layers").rglob("*.yaml")}
    assert layers and layers <= set(names)
    shipped = {"fastprompt/weights/fastprompt-world.safetensors", "fastprompt/weights/fastprompt-world.json",
               "fastprompt/model_configs/fastprompt-world.json"}
    assert shipped <= set(names)  # the demo's CLIP ships inside the package
    target = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    return target


def _fastprompt(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(target))  # the installed copy, ahead of the checkout
    code = "import fastprompt, sys; assert fastprompt.__file__.startswith(sys.argv[1]), fastprompt.__file__; " \
           "from fastprompt.cli import main; sys.exit(main(sys.argv[2:]))"
    return subprocess.run([sys.executable, "-c", code, str(target), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_an_installed_wheel_composes_configs_without_a_checkout(installed, tmp_path):
    printed = _fastprompt(installed, tmp_path, "config", "--protocol", "base2new", "--method", "dept+cocoop")
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert printed.stdout == (REPO / "configs" / "base2new" / "dept_cocoop.yaml").read_text().replace(
        "configs/base2new/dept_cocoop.yaml", "CONFIG.yaml")
    (tmp_path / "sweep.yaml").write_text("protocol: domain_generalisation\nmethods: [dept+maple]\n"
                                         "datasets: [imagenet]\nseeds: [1]\noverrides: [data.root=/data]\n")
    emitted = _fastprompt(installed, tmp_path, "sweep", "sweep.yaml", "--emit-commands")
    assert emitted.returncode == 0, emitted.stderr[-2000:]
    assert emitted.stdout.startswith("fastprompt train --protocol domain_generalisation --method dept+maple ")


def test_an_installed_wheel_loads_the_shipped_world_weights(installed, tmp_path):
    info = _fastprompt(installed, tmp_path, "world", "info")
    assert info.returncode == 0, info.stderr[-2000:]
    assert f"shipped weights fastprompt-world/world: {installed / 'fastprompt' / 'weights'}" in info.stdout
