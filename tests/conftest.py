"""Shared fixtures: tiny seeded data, a few torch threads, the real CT folder when present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from synthetic import make_preprocessed_set

# Two cores on CI: keep torch from oversubscribing them.
torch.set_num_threads(2)

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A preprocessed set of 6 cases (4 labeled, 2 with tumor) of shape 32x32x8. Do not modify."""
    return make_preprocessed_set(tmp_path_factory.mktemp("tiny_dataset"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data/real`` next to the checkout; tests using it skip when it is absent."""
    if not REAL_DATA.is_dir():
        pytest.skip("real CT test data (../shared/data/real) not present")
    return REAL_DATA
