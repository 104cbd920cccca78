"""Benchmark-wide setup: as in tests/conftest.py, Triton must learn whether to interpret before it
is imported; without a GPU the suites run their tiny smoke shapes through the interpreter."""
import os
import shutil

if shutil.which("nvidia-smi") is None and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
