"""The training defaults that decide whether a model learns: budget, patience, augmentation."""

from __future__ import annotations

import pytest
import torch

from mmops.config import TrainConfig, load_params
from mmops.training.optim import step_budget
from mmops.training.progress import TrainProgress, chance_floor
from mmops.training.steps import augment


def epoch(accuracy: float, loss: float = 1.0) -> dict[str, float]:
    return {"val_accuracy": accuracy, "val_loss": loss}


def test_a_small_dataset_gets_epochs_and_patience_to_reach_min_steps() -> None:
    cfg = TrainConfig(epochs=30, early_stopping_patience=6, min_steps=1500)

    small = step_budget(cfg, steps_per_epoch=8)  # 250 rows at batch 32

    assert small.epochs == 188
    assert small.early_stopping_patience == 38  # 6 of 30, in proportion
    assert small.epochs * 8 >= cfg.min_steps


def test_a_large_dataset_keeps_its_epochs_and_patience() -> None:
    cfg = TrainConfig(epochs=30, early_stopping_patience=6, min_steps=1500)

    assert step_budget(cfg, steps_per_epoch=3000) == cfg
    assert step_budget(TrainConfig(min_steps=0), steps_per_epoch=1) == TrainConfig(min_steps=0)


def test_patience_does_not_run_while_val_accuracy_is_at_chance() -> None:
    progress = TrainProgress(floor=chance_floor([0] * 10 + [1] * 10 + [2] * 10))

    progress.record(epoch(0.40))
    for _ in range(20):  # a plateau at chance: no epoch counts against the model
        progress.record(epoch(0.30))

    assert progress.bad_epochs == 0
    assert not progress.out_of_patience(6)


def test_patience_runs_once_val_accuracy_clears_chance() -> None:
    progress = TrainProgress(floor=chance_floor([0] * 50 + [1] * 50))

    progress.record(epoch(0.9))
    for _ in range(6):
        progress.record(epoch(0.8))

    assert progress.out_of_patience(6)
    assert progress.best_epoch == 1


@pytest.mark.parametrize(
    ("labels", "expected"),
    [([0] * 50 + [1] * 50, 0.5 + 2 * 0.05), ([0] * 90 + [1] * 10, 0.9 + 2 * 0.03), ([], 0.0)],
)
def test_chance_floor_is_the_commonest_share_plus_two_standard_errors(
    labels: list[int], expected: float
) -> None:
    assert chance_floor(labels) == pytest.approx(expected)


def test_no_augmentation_that_can_change_a_label_is_on_by_default() -> None:
    assert TrainConfig().augment == "none"
    assert load_params("params.yaml").train.augment == "none"


def test_old_checkpoints_without_a_floor_resume() -> None:
    saved = {"epoch": 3, "best_val_accuracy": 0.5, "best_val_loss": 1.0, "best_epoch": 2}

    assert TrainProgress.from_dict(saved).floor == 0.0


def test_noise_augmentation_is_seeded_and_keeps_the_image() -> None:
    pixels = torch.zeros(4, 3, 8, 8)

    torch.manual_seed(0)
    first = augment(pixels, "noise")
    torch.manual_seed(0)
    again = augment(pixels, "noise")

    torch.testing.assert_close(first, again)
    assert first.shape == pixels.shape
    assert 0.15 < float(first.std()) < 0.25  # NOISE_STD, a tenth of the [-1, 1] range
    assert augment(pixels, "none") is pixels
