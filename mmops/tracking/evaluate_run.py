"""The evaluate stage tracked in MLflow: test metrics and the report on the model's run."""

from __future__ import annotations

from pathlib import Path

import mlflow

from mmops.config import Params
from mmops.evaluation.records import EvaluationReport
from mmops.serving.references import logged_model_id, resolve_model
from mmops.tracking.runs import configure, standalone_run_name


def tracked_evaluate(
    model_ref: str, data_dir: Path | str, params: Params, out_dir: Path | str | None = None
) -> tuple[EvaluationReport, str]:
    """Evaluate and log metrics and the report to the model's training run (or a new run)."""
    from mmops.evaluation.evaluate import evaluate_model
    from mmops.evaluation.metrics import flat_metrics

    folder, run_id = resolve_model(model_ref)
    configure(params)
    out = Path(out_dir or params.evaluate.out_dir)
    report = evaluate_model(folder, data_dir, params, out)
    name = None if run_id else standalone_run_name("evaluate", data_dir)
    with mlflow.start_run(run_id=run_id, run_name=name) as run:
        # Linked to the evaluated logged model, so MLflow's Models view ranks models by them.
        mlflow.log_metrics(
            {f"test.{k}": v for k, v in flat_metrics(report).items()},
            model_id=logged_model_id(model_ref),
        )
        mlflow.log_artifacts(str(out), artifact_path="evaluation")
        mlflow.set_tag("mmops.evaluated", "true")
    return report, run.info.run_id
