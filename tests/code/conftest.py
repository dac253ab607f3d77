"""Shared fixtures: one small, valid demo dataset and params whose thresholds fit it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmops.config import Params, load_params
from mmops.demo_data import make_demo_data

# Thresholds sized for 400 rows; the defaults expect a dataset of a few thousand.
SMALL_OVERRIDES = (
    "validate.min_examples_per_class=5",
    "validate.min_split_size.train=50",
    "validate.min_split_size.val=5",
    "validate.min_split_size.test=5",
)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid 400-row demo dataset; tests that change it must work on a copy."""
    out = tmp_path_factory.mktemp("demo") / "data"
    make_demo_data(out, n=400, seed=1)
    return out


@pytest.fixture(scope="session")
def small_overrides() -> tuple[str, ...]:
    return SMALL_OVERRIDES


@pytest.fixture(scope="session")
def small_params() -> Params:
    return load_params(None, SMALL_OVERRIDES)
