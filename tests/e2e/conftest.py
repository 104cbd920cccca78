"""Shared fixtures for the end-to-end tests: the digits ImageFolder (real images, no network) and
fast settings for the tiny randomly initialised CLIP."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Fast but real: the demo's model and data with few epochs and one seed.
FAST = ["model.name=fastprompt-tiny", "model.pretrained=null", "data.dataset=imagefolder", "data.seeds=[1]",
        "data.crop_scale=[0.9,1.0]", "train.epochs=3", "train.batch_size=8", "train.precision=fp32",
        "train.device=cpu", "train.num_workers=0", "train.progress=false", "optim.lr=0.05"]


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from fastprompt.data import write_digits_imagefolder

    return write_digits_imagefolder(tmp_path_factory.mktemp("digits") / "data", image_size=32)


@pytest.fixture
def fast() -> list[str]:
    return list(FAST)


def _run_cli(*args: str, cwd: Path = REPO, timeout: float = 240):
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fastprompt", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def run_cli():
    """Run `python -m fastprompt ARGS` in a fresh process; returns the CompletedProcess."""
    return _run_cli
