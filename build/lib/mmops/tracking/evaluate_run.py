"""The evaluate stage tracked in MLflow: test metrics and the report on the model's run, and the
classical baseline (and a dual encoder's zero-shot floor) beside it."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow

from mmops.config import BaselineConfig, Params
from mmops.evaluation.records import BaselineResult, EvaluationReport, ZeroShotResult
from mmops.serving.references import logged_model_id, resolve_model
from mmops.tracking.runs import configure, standalone_run_name

BASELINE_MODEL = "baseline"


def tracked_evaluate(
    model_ref: str, data_dir: Path | str, params: Params, out_dir: Path | str | None = None
) -> tuple[EvaluationReport, str]:
    """Evaluate and log metrics and the report to the model's training run (or a new run)."""
    from mmops.evaluation.evaluate import evaluate_model
    from mmops.evaluation.metrics import flat_metrics

    configure(params)
    out = Path(out_dir or params.evaluate.out_dir)
    with tempfile.TemporaryDirectory(prefix="mmops-model-") as download:  # no leftovers
        folder, run_id = resolve_model(model_ref, Path(download))
        report = evaluate_model(folder, data_dir, params, out)
    name = None if run_id else standalone_run_name("evaluate", data_dir)
    # The baselines' figures go under their own names (log_baseline, log_zero_shot).
    own = ("baseline.", "zero_shot.")
    metrics = {k: v for k, v in flat_metrics(report).items() if not k.startswith(own)}
    with mlflow.start_run(run_id=run_id, run_name=name) as run:
        # Linked to the evaluated logged model, so MLflow's Models view ranks models by them.
        model_id = logged_model_id(model_ref)
        mlflow.log_metrics({f"test.{k}": v for k, v in metrics.items()}, model_id=model_id)
        if report.baseline is not None:
            gain = report.classification.accuracy - report.baseline.test_accuracy
            mlflow.log_metrics({"test.baseline_gain": gain}, model_id=model_id)
            log_baseline(report.baseline, params.evaluate.baseline, model_id)
        if report.zero_shot is not None:
            log_zero_shot(report.zero_shot, report.classification.accuracy, model_id)
        mlflow.log_artifacts(str(out), artifact_path="evaluation")
        mlflow.set_tag("mmops.evaluated", "true")
        mlflow.set_tag("mmops.underfit", str(report.underfit is not None).lower())
    return report, run.info.run_id


def log_baseline(
    baseline: BaselineResult, cfg: BaselineConfig, model_id: str | None = None
) -> str | None:
    """Log the baseline's figures to the active run (linked to the evaluated model `model_id`)
    and the fitted pipeline to a nested run `baseline`; the baseline's logged model id."""
    figures = {
        "baseline_test_accuracy": baseline.test_accuracy,
        "baseline_val_accuracy": baseline.val_accuracy,
        "baseline_test_macro_f1": baseline.test_macro_f1,
    }
    mlflow.log_metrics(figures, model_id=model_id)
    # A tag, not a param: a run evaluated again may pick the other kind.
    mlflow.set_tag("baseline_kind", baseline.kind)
    if baseline.pipeline is None:
        return None
    # Its own run: a model logged to the training run would be linked to that run's metrics.
    with mlflow.start_run(run_name=BASELINE_MODEL, nested=True):
        mlflow.log_params({"baseline_kind": baseline.kind, **asdict(cfg)})
        info = mlflow.sklearn.log_model(
            baseline.pipeline,
            name=BASELINE_MODEL,
            # skops refuses types it does not know; these are the ones this pipeline holds.
            skops_trusted_types=_untrusted_types(baseline.pipeline),
            # Given, not inferred: inference would list every package the process has imported.
            pip_requirements=_requirements(),
        )
        mlflow.log_metrics(figures, model_id=info.model_id)
        mlflow.log_metrics(
            {"train_examples": baseline.train_examples, "fit_seconds": baseline.seconds}
        )
    return info.model_id


def log_zero_shot(zero_shot: ZeroShotResult, accuracy: float, model_id: str | None = None) -> None:
    """Log the zero-shot floor's figures, and the model's gain over it, to the active run."""
    figures = {
        "zero_shot_test_accuracy": zero_shot.test_accuracy,
        "zero_shot_test_macro_f1": zero_shot.test_macro_f1,
        "test.zero_shot_gain": accuracy - zero_shot.test_accuracy,
    }
    mlflow.log_metrics(figures, model_id=model_id)
    mlflow.set_tag("zero_shot_checkpoint", zero_shot.checkpoint)


def _untrusted_types(pipeline: Any) -> list[str]:
    import skops.io

    return list(skops.io.get_untrusted_types(data=skops.io.dumps(pipeline)))


def _requirements() -> list[str]:
    from importlib.metadata import version

    names = ("scikit-learn", "skops", "numpy", "pandas")
    return [f"{name}=={version(name)}" for name in names]
