"""The train stage tracked in MLflow: params, data version, dataset, per-epoch metrics, model."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow

from mmops.config import Params, to_dict
from mmops.data.versioning import DataVersion, data_version
from mmops.tracking.pyfunc import log_pyfunc
from mmops.tracking.runs import (
    MlflowTracker,
    configure,
    flatten,
    run_name,
    write_run_file,
)
from mmops.training.progress import TrainResult
from mmops.training.validation_gate import DataValidation, require_validation


@dataclass(frozen=True)
class TrackedRun:
    """A training run as MLflow holds it: its id, the logged model, and what training reported."""

    run_id: str
    model_uri: str
    result: TrainResult

    @property
    def model_dir(self) -> Path:
        return self.result.model_dir


def tracked_train(
    data_dir: Path | str,
    params: Params,
    out_dir: Path | str | None = None,
    resume: bool = False,
    validation_report: Path | str | None = None,
    allow_unvalidated: bool = False,
) -> TrackedRun:
    """Train inside an MLflow run: params, data version, dataset, per-epoch metrics, the model.

    The data must have passed validation at its exact version (the report at
    `validation_report`, default `train.validation_report`); `allow_unvalidated` trains anyway
    and tags the run `mmops.validation: skipped`. Without `resume`, `out_dir` starts empty.
    """
    from mmops.data.dataset import load_splits
    from mmops.training.train import train

    version = data_version(data_dir)
    # Refused data and a dataset that cannot load leave no MLflow run and no folder touched.
    report = validation_report or params.train.validation_report
    validation = require_validation(data_dir, report, allow_unvalidated, data_md5=version.md5)
    frame = load_splits(data_dir, params)
    out = Path(out_dir or params.train.out_dir)
    if not resume and out.exists():
        shutil.rmtree(out)  # a stale checkpoint must not leak into a fresh run
    configure(params)
    name = run_name("train", version.md5)
    with mlflow.start_run(run_name=name, log_system_metrics=True) as run:
        mlflow.log_params(flatten(to_dict(params)))
        mlflow.set_tags({"mmops.stage": "train", **data_tags(data_dir, version, validation)})
        dataset = mlflow.data.from_pandas(
            frame,
            source=str(Path(data_dir).resolve()),
            name=Path(data_dir).name,
            digest=version.md5[:32],
        )
        mlflow.log_input(dataset, context="training")
        result = train(
            data_dir, params, out, tracker=MlflowTracker(), resume=resume, validation=validation
        )
        mlflow.log_dict(result.to_dict(), "train/history.json")
        info = log_pyfunc(result.model_dir, frame, data_dir)
        # Linked to the logged model (and its dataset), so MLflow's Models view ranks them.
        mlflow.log_metrics(
            {
                "best_val_accuracy": result.best_val_accuracy,
                "best_epoch": result.best_epoch,
                "epochs_run": result.epochs_run,
                "parameters": result.parameters,
            },
            model_id=info.model_id,
            dataset=dataset,
        )
        write_run_file(result.model_dir, run.info.run_id, info.model_uri, info.model_id)
    return TrackedRun(run.info.run_id, info.model_uri, result)


def data_tags(
    data_dir: Path | str, version: DataVersion, validation: DataValidation
) -> dict[str, str]:
    """A training run's data: its path and version, git, and how validation admitted it."""
    return {
        "data.path": str(data_dir),
        "data.md5": version.md5,
        "data.dvc_md5": str(version.dvc_md5),
        "data.tracked_by_dvc": str(version.tracked),
        "git.commit": str(version.git_commit),
        "git.dirty": str(version.git_dirty),
        **validation.tags(),
    }
