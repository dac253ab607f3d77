"""The search space in params.yaml: checked against the params naming the key, sampled
reproducibly, and its best values written back in forms `--set` and the params loader read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from typer.testing import CliRunner

from mmops.cli import app
from mmops.config import ConfigError, Params, SearchConfig, load_params
from mmops.tracking.search_space import (
    override_args,
    parse_space,
    read_params_file,
    with_overrides,
    write_params_file,
)
from mmops.tracking.tune import TrialTracker, new_study

ROOT = Path(__file__).resolve().parents[2]
SPACE = (
    "train.search.space={train.lr: {low: 0.0001, high: 0.01, log: true}, "
    "model.dropout: {low: 0, high: 0.3}, train.batch_size: {choices: [16, 32, 64]}}"
)


def with_space(space: str) -> Params:
    return load_params(None, [f"train.search.space={space}"])


def test_the_default_space_in_params_yaml_is_valid() -> None:
    dims = parse_space(load_params(ROOT / "params.yaml"))
    assert {d.key for d in dims} >= {"train.lr", "model.dropout", "train.batch_size"}


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            "{train.lr: {low: 0.01, high: 0.001}}",
            r"train.search.space\['train.lr'\]: low must be < high",
        ),
        (
            "{model.dropot: {low: 0.0, high: 0.5}}",
            r"\['model.dropot'\]: unknown params key 'model.dropot' \(did you mean 'model.dropout'",
        ),
        (
            "{train.batch_size: {choices: [16, 0.5]}}",
            r"\['train.batch_size'\]: choices\[1\]=0.5 makes the params invalid: "
            r"'train.batch_size' must be int",
        ),
        (
            "{train.epochs: {low: 0, high: 10}}",
            r"\['train.epochs'\]: low=0 makes the params invalid: train.epochs",
        ),
        ("{train.lr: {low: 1e-4, high: 0.1}}", r"\['train.lr'\]: low must be a number.*1.0e-4"),
        ("{train.lr: {low: 0.0, high: 0.1, log: true}}", r"\['train.lr'\]: a log range needs low"),
        ("{train.lr: {lo: 0.1, high: 0.2}}", r"unknown field 'lo' \(did you mean 'low'"),
        ("{train.lr: {high: 0.2}}", r"\['train.lr'\]: give both low and high"),
        ("{train.batch_size: {choices: []}}", r"choices must be a non-empty list"),
        ("{train: {low: 1, high: 2}}", r"\['train'\]: 'train' is a section"),
        ("{train.search.trials: {low: 1, high: 5}}", r"cannot search its own settings"),
        ("{train.lr: 0.1}", r"train.search.space\['train.lr'\]: must be a mapping"),
        ("[train.lr]", r"train.search.space: must be a mapping"),
        ("{}", r"train.search.space: empty"),
    ],
)
def test_a_bad_space_is_named_by_its_key(space: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_space(with_space(space))


def test_int_bounds_sample_ints_and_float_fields_sample_floats() -> None:
    dims = parse_space(
        with_space(
            "{model.hidden_dim: {low: 32, high: 128, step: 32}, model.dropout: {low: 0, high: 1}}"
        )
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    hidden, dropout = (dim.suggest(trial) for dim in dims)
    assert isinstance(hidden, int) and hidden in (32, 64, 96, 128)
    assert isinstance(dropout, float) and 0.0 <= dropout <= 1.0


def sampled(seed: int, trials: int = 4) -> list[dict[str, Any]]:
    """What a study samples for its first trials, told a score per trial as training would."""
    params = load_params(None, [SPACE, f"train.search.seed={seed}"])
    dims = parse_space(params)
    study = new_study(params.train.search, trial_epochs=4)
    values = []
    for i in range(trials):
        trial = study.ask()
        values.append({dim.key: dim.suggest(trial) for dim in dims})
        study.tell(trial, 0.1 * i)
    return values


def test_the_same_seed_samples_the_same_params() -> None:
    first = sampled(seed=7)
    assert first == sampled(seed=7)
    assert first != sampled(seed=8)
    assert len({tuple(v.items()) for v in first}) == len(first)


class FakeMlflow:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass


def report(study: optuna.Study, accuracies: list[float]) -> int:
    """Report per-epoch val accuracies through the trial tracker; the epochs it ran."""
    trial = study.ask()
    tracker = TrialTracker(trial)
    tracker._mlflow = FakeMlflow()  # type: ignore[assignment]
    for epoch, accuracy in enumerate(accuracies, start=1):
        try:
            tracker.log_metrics({"val_accuracy": accuracy}, step=epoch)
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return epoch
    study.tell(trial, max(accuracies))
    return len(accuracies)


def test_a_trial_behind_is_pruned_after_the_warmup_and_startup_trials() -> None:
    study = new_study(SearchConfig(), trial_epochs=8)  # warm-up: 2 epochs
    low = [0.1, 0.1, 0.1, 0.1]
    assert report(study, low) == 4  # the first two trials always finish
    assert report(study, [0.9] * 4) == 4
    assert report(study, [0.9] * 4) == 4
    assert report(study, low) == 2  # not at epoch 1, at chance for every model


def test_best_values_round_trip_through_the_params_file_and_set(tmp_path: Path) -> None:
    best = {"train.lr": 1e-05, "model.dropout": 0.123456789, "train.batch_size": 16}
    path = write_params_file(tmp_path / "search" / "best_params.yaml", best)
    assert read_params_file(path) == best
    from_set = load_params(None, override_args(best))
    assert from_set == with_overrides(Params(), best)
    assert (from_set.train.lr, from_set.model.dropout, from_set.train.batch_size) == (
        1e-05,
        0.123456789,
        16,
    )


def test_with_overrides_checks_the_values() -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        with_overrides(Params(), {"train.batch_size": "big"})


def test_tune_with_a_bad_space_exits_two_naming_the_key(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "tune",
            "--data",
            str(tmp_path),
            "--set",
            "train.search.space={model.dropot: {low: 0, high: 1}}",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "model.dropot" in result.output and "did you mean 'model.dropout'" in result.output
