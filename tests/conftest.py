"""Shared fixtures. Everything is built in memory or under ``tmp_path``; nothing is written into ``tests/``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub downloads fail fast instead of retrying for ~47 s

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _quiet_progress():
    import spade_sc as ss

    old = ss.settings.progress_bar
    ss.settings.progress_bar = False
    yield
    ss.settings.progress_bar = old


@pytest.fixture(scope="session")
def toy_master():
    import spade_sc as ss

    return ss.datasets.toy(random_state=0)


@pytest.fixture
def toy(toy_master):
    """A fresh copy of the default toy data (1600 spots, 4 slides, 300 genes, 64-d features)."""
    return toy_master.copy()


@pytest.fixture(scope="session")
def small_toy_master():
    import spade_sc as ss

    return ss.datasets.toy(random_state=1, n_slides=3, grid=10)


@pytest.fixture
def small_toy(small_toy_master):
    """300 spots over 3 slides."""
    return small_toy_master.copy()


@pytest.fixture(scope="session")
def her2st_dir():
    """``../shared/data/her2st`` (skips when the real data is absent)."""
    path = SHARED_DATA / "her2st"
    if not path.is_dir():
        pytest.skip("real her2st data not present in ../shared/data")
    return path


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
