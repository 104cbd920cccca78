# The two commands a new user runs (README): `make test` and `make demo`.
# Each creates .venv on first use and installs fastprompt into it (editable).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned pair: this torch/torchvision combination imports cleanly together (torch 2.13 with PyPI's torchvision fails to import).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: venv test test-fast demo clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Kernels run natively when a GPU is present and under the Triton interpreter otherwise
# (tests/conftest.py decides before triton is imported).
test: venv
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

# The README's main-job command: a complete base-to-new run (DePT + CoOp) on CPU, no network.
DEMO_ARGS ?=
demo: venv
	$(PY) -m fastprompt demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
