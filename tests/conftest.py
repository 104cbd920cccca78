"""Test-wide setup.

Triton must learn whether to interpret *before* it is imported: with no CUDA device we switch the
interpreter on, so every kernel test runs on the CPU in CI and natively on a GPU.
"""
import os
import shutil

if shutil.which("nvidia-smi") is None and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    # The test models are tiny: with two test workers sharing 2 cores, a second intra-op thread
    # only spins. One thread per worker keeps the suite fast and its timings stable.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed_everything():
    # Fresh but reproducible random inputs in every test.
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
