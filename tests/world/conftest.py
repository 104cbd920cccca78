"""Shared fixtures for the world tests: one rendered data root per test session."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def world_root(tmp_path_factory) -> Path:
    """A data root with the clean domain rendered (the other domains render on first use)."""
    from fastprompt.world.dataset import render_domain

    root = tmp_path_factory.mktemp("world-data")
    render_domain(root / "world", "clean")
    return root
