"""MLflow runs: the store and experiment, the training loop's tracker, run files and UI links."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow

from mmops.config import Params
from mmops.environment import tracking_uri
from mmops.serving.references import RUN_FILE
from mmops.tracking.deadlines import apply_deadlines
from mmops.tracking.orphans import tag_runs_with_process


def configure(params: Params) -> None:
    """The store, its deadlines and the experiment; new runs carry this process's host and pid."""
    apply_deadlines(params.tracking)
    tag_runs_with_process()
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(params.tracking.experiment)


class MlflowTracker:
    """The training loop's Tracker, writing to the active MLflow run."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def write_run_file(folder: Path, run_id: str, model_uri: str, model_id: str | None = None) -> None:
    """Record beside a model folder the MLflow run and logged model it belongs to."""
    run_info = {
        "run_id": run_id,
        "model_uri": model_uri,
        "model_id": model_id,
        "tracking_uri": mlflow.get_tracking_uri(),
    }
    (folder / RUN_FILE).write_text(json.dumps(run_info, indent=2) + "\n")


def run_name(stage: str, data_md5: str) -> str:
    """An MLflow run name that says the stage and the data version, e.g. `train-ffc43c92`."""
    return f"{stage}-{data_md5[:8]}"


def standalone_run_name(stage: str, data_dir: Path | str) -> str:
    """The name of a stage's own run (a model with no training run to log to)."""
    from mmops.data.versioning import data_version

    return run_name(stage, data_version(data_dir).md5)
