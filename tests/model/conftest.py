"""A tiny model trained once per session, for the behavioural tests on a trained model."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmops.config import Params, load_params
from mmops.training.train import TrainResult, train
from mmops.training.validation_gate import DataValidation

# Four epochs at a learning rate where the tiny model's train loss falls every time; the
# contrastive term makes evaluation report retrieval too.
TRAINED_OVERRIDES = ("train.epochs=4", "train.lr=0.003", "train.contrastive_weight=0.1")


@pytest.fixture(scope="session")
def train_params(tiny_overrides: tuple[str, ...]) -> Params:
    return load_params(None, [*tiny_overrides, *TRAINED_OVERRIDES])


@pytest.fixture(scope="session")
def trained_run(
    demo_dir: Path,
    demo_validation: DataValidation,
    train_params: Params,
    tmp_path_factory: pytest.TempPathFactory,
) -> TrainResult:
    """The shared trained run; tests must not write into its folder."""
    out = tmp_path_factory.mktemp("trained")
    return train(demo_dir, train_params, out_dir=out, progress=False, validation=demo_validation)
