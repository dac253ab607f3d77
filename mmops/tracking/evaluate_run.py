"""The evaluate stage tracked in MLflow: test metrics and the report on the model's run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow

from mmops.config.sections import Params
from mmops.serving.references import resolve_model
from mmops.tracking.runs import configure


def tracked_evaluate(
    model_ref: str, data_dir: Path | str, params: Params, out_dir: Path | str | None = None
) -> tuple[dict[str, Any], str]:
    """Evaluate and log metrics and the report to the model's training run (or a new run)."""
    from mmops.evaluation.evaluate import evaluate_model, flat_metrics

    folder, run_id = resolve_model(model_ref)
    configure(params)
    out = Path(out_dir or params.evaluate.out_dir)
    metrics = evaluate_model(folder, data_dir, params, out)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "evaluate") as run:
        mlflow.log_metrics({f"test.{k}": v for k, v in flat_metrics(metrics).items()})
        mlflow.log_artifacts(str(out), artifact_path="evaluation")
        mlflow.set_tag("mmops.evaluated", "true")
    return metrics, run.info.run_id
