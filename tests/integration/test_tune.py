"""`mmops tune` on tiny data against a real MLflow store (SQLite in tmp), and the retrain's
training step fed its best values."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytest
from typer.testing import CliRunner

from mmops.cli import app
from mmops.config import load_params
from mmops.tracking.search_space import read_params_file, with_overrides
from mmops.tracking.tune import SearchResult

pytestmark = pytest.mark.integration

TRIALS = 3
SEARCH = (
    "train.search.epochs=2",
    "train.search.seed=3",
    "train.search.space={train.lr: {low: 0.0005, high: 0.01, log: true}, "
    "model.dropout: {low: 0.0, high: 0.3}, train.batch_size: {choices: [16, 32]}}",
)


@dataclass(frozen=True)
class Searched:
    workdir: Path
    overrides: tuple[str, ...]
    summary: dict[str, Any]
    client: mlflow.MlflowClient


@pytest.fixture(scope="module")
def searched(
    demo_dir: Path, tiny_overrides: tuple[str, ...], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Searched]:
    """One 3-trial `mmops tune` in a fresh SQLite store."""
    workdir = tmp_path_factory.mktemp("tune")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    overrides = (*tiny_overrides, *SEARCH)
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        # Trials train only on a data version that passed: the report where tune looks for it.
        sets = [a for o in overrides for a in ("--set", o)]
        validated = CliRunner().invoke(
            app, ["validate", str(demo_dir), "--out", "reports/validate", *sets]
        )
        assert validated.exit_code == 0, validated.output
        args = ["tune", "--data", str(demo_dir), "--trials", str(TRIALS), "--json"]
        result = CliRunner().invoke(app, [*args, *sets])
        assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        yield Searched(workdir, overrides, summary, mlflow.MlflowClient(uri))
    mlflow.set_tracking_uri(previous_uri)


def trial_runs(s: Searched) -> list[Any]:
    parent = s.client.get_run(s.summary["parent_run_id"])
    return s.client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )


def test_each_trial_is_a_nested_run_under_one_parent(searched: Searched) -> None:
    parent = searched.client.get_run(searched.summary["parent_run_id"])
    children = trial_runs(searched)

    assert parent.info.run_name.startswith("tune-") and parent.data.tags["mmops.stage"] == "tune"
    assert parent.data.tags["mmops.validation"] == "passed"
    assert len(children) == TRIALS == searched.summary["n_trials"]
    states = [run.data.tags["state"] for run in children]
    assert set(states) <= {"complete", "pruned"}
    assert states.count("pruned") == searched.summary["n_pruned"]
    for run in children:
        assert set(run.data.params) == {"train.lr", "model.dropout", "train.batch_size"}
        history = searched.client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [1, 2][: len(history)] and history
    # The parent holds the space and the best values.
    assert parent.data.params["train.search.space.train.lr.log"] == "True"
    assert parent.data.metrics["best_val_accuracy"] == searched.summary["best_value"]


def test_the_best_params_file_holds_the_best_trial(searched: Searched) -> None:
    # Relative to the working directory, like every default output folder.
    path = searched.workdir / searched.summary["params_file"]
    assert path == searched.workdir / "models" / "search" / "best_params.yaml"
    best = read_params_file(path)
    assert best == searched.summary["best_overrides"]
    parent = searched.client.get_run(searched.summary["parent_run_id"])
    assert {k: parent.data.params[f"best.{k}"] for k in best} == {
        k: str(v) for k, v in best.items()
    }
    complete = [r for r in trial_runs(searched) if r.data.tags["state"] == "complete"]
    top = max(complete, key=lambda run: run.data.metrics["best_val_accuracy"])
    assert top.data.metrics["best_val_accuracy"] == searched.summary["best_value"]
    assert top.data.params == {k: str(v) for k, v in best.items()}


def test_the_retrain_trains_with_the_best_params(searched: Searched, demo_dir: Path) -> None:
    from mmops_flows.retrain import train

    best = read_params_file(searched.workdir / searched.summary["params_file"])
    result = SearchResult(
        **{**searched.summary, "params_file": Path(searched.summary["params_file"])}
    )
    params = with_overrides(load_params(None, searched.overrides), best)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(searched.workdir)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{searched.workdir / 'mlflow.db'}")
        # The flow's training task, as the flow calls it after its search task.
        trained = train.fn(str(demo_dir), params, str(searched.workdir / "run"), result)
    run = searched.client.get_run(trained["run_id"])

    assert run.data.tags["mmops.stage"] == "train"
    for key, value in best.items():
        assert run.data.params[key] == str(value)
        assert run.data.params[f"search.best.{key}"] == str(value)
    assert run.data.tags["mmops.search.run_id"] == searched.summary["parent_run_id"]
