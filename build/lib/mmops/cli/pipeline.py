"""Commands of the model pipeline: tune, train, evaluate, zero-shot, export and predict."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mmops.cli.common import (
    JsonOption,
    MetricsOption,
    ParamsOption,
    SetOption,
    UserError,
    command,
    load_command_params,
    say,
    write_json,
)

if TYPE_CHECKING:
    from mmops.tracking.train_run import TrackedRun

VALIDATION_HINT = (
    "`mmops validate DIR --out reports/validate` writes the report training reads "
    "(--validation-report PATH for another); --allow-unvalidated trains anyway, tagged on the run"
)
ValidationReportOption = Annotated[
    Path | None,
    typer.Option(
        "--validation-report",
        help="validation.json that must pass this exact data (default: train.validation_report)",
    ),
]
AllowUnvalidatedOption = Annotated[
    bool,
    typer.Option(
        "--allow-unvalidated",
        help="train on data without a passing report for its version; warns, tags the run",
    ),
]


@contextmanager
def refused_as_user_error() -> Iterator[None]:
    """Data refused for want of a passing validation report: one error line and its fix."""
    from mmops.training.validation_gate import UnvalidatedDataError

    try:
        yield
    except UnvalidatedDataError as exc:
        raise UserError(str(exc), VALIDATION_HINT) from None


@command()
def tune(
    data: Annotated[Path, typer.Option("--data", help="dataset directory")],
    params_file: ParamsOption = None,
    overrides: SetOption = None,
    trials: Annotated[
        int | None, typer.Option(min=1, help="trials to run (default: train.search.trials)")
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            min=0,
            help="start no trial after S seconds; 0: no limit (default: train.search.timeout_s)",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="folder of best_params.yaml (default: train.search.out_dir)")
    ] = None,
    validation_report: ValidationReportOption = None,
    allow_unvalidated: AllowUnvalidatedOption = False,
    as_json: JsonOption = False,
) -> None:
    """Search train.search.space with Optuna, each trial a nested MLflow run; save the best."""
    import shlex

    from mmops.tracking.search_space import override_args
    from mmops.tracking.tune import tune as run_search

    params = load_command_params(params_file, overrides)
    with refused_as_user_error():
        result = run_search(
            data,
            params,
            trials=trials,
            timeout_s=timeout,
            out_dir=out,
            validation_report=validation_report,
            allow_unvalidated=allow_unvalidated,
        )
    say(
        f"best val accuracy {result.best_value:.4f} in {result.n_trials} trials "
        f"({result.n_pruned} pruned); run {result.parent_run_id}; params {result.params_file}"
    )
    say(
        "train with them: "
        + " ".join(f"--set {shlex.quote(item)}" for item in override_args(result.best_overrides))
    )
    if as_json:
        typer.echo(json.dumps(result.to_dict()))


@command()
def train(
    data: Annotated[Path, typer.Option("--data", help="dataset directory")],
    params_file: ParamsOption = None,
    overrides: SetOption = None,
    out: Annotated[Path | None, typer.Option(help="output folder (default: train.out_dir)")] = None,
    resume: Annotated[
        bool, typer.Option(help="continue from the checkpoint in the output folder")
    ] = False,
    metrics: MetricsOption = None,
    validation_report: ValidationReportOption = None,
    allow_unvalidated: AllowUnvalidatedOption = False,
    as_json: JsonOption = False,
) -> None:
    """Train a model on the dataset's train split, tracked in MLflow.

    Only on data that passed `mmops validate` at this exact version, unless --allow-unvalidated.
    """
    from mmops.tracking.train_run import tracked_train

    params = load_command_params(params_file, overrides)
    out_dir = out or Path(params.train.out_dir)
    report = validation_report or Path(params.train.validation_report)
    if int(os.environ.get("RANK", "0")) > 0:
        # Under torchrun the other processes train their shards; rank 0 alone clears the
        # folder, tracks the run in MLflow, saves and logs the model and reports. Each process
        # checks the data it reads against the report.
        from mmops.training.train import train as train_shard
        from mmops.training.validation_gate import require_validation

        with refused_as_user_error():
            validation = require_validation(data, report, allow_unvalidated)
        train_shard(data, params, out_dir, resume=resume, progress=False, validation=validation)
        return
    with refused_as_user_error():
        run = tracked_train(
            data,
            params,
            out_dir,
            resume=resume,
            validation_report=report,
            allow_unvalidated=allow_unvalidated,
        )
    summary = train_summary(run)
    if metrics is not None:
        write_json(metrics, summary)
    if "validation_reason" in summary:
        say(f"warning: trained on unvalidated data: {summary['validation_reason']}")
    say(
        f"trained: best val accuracy {summary['best_val_accuracy']:.4f} at epoch "
        f"{summary['best_epoch']}; run {run.run_id}; model {run.model_uri}"
    )
    if as_json:
        typer.echo(json.dumps(summary))


def train_summary(run: TrackedRun) -> dict[str, Any]:
    """What `mmops train` reports (--metrics, --json): the run, the model and its data's gate."""
    summary = {
        "run_id": run.run_id,
        "model_uri": run.model_uri,
        "model_dir": str(run.model_dir),
        "best_val_accuracy": run.result.best_val_accuracy,
        "best_epoch": run.result.best_epoch,
        "epochs_run": run.result.epochs_run,
        "parameters": run.result.parameters,
        "device": run.result.device,
        # passed: a report vouched for this data version; skipped: --allow-unvalidated.
        "validation": run.result.validation["status"],
    }
    if run.result.validation["reason"]:
        summary["validation_reason"] = run.result.validation["reason"]
    return summary


@command()
def evaluate(
    data: Annotated[Path, typer.Option("--data", help="dataset directory")],
    model: Annotated[str, typer.Option("--model", help="model folder, runs:/ or models:/ URI")],
    params_file: ParamsOption = None,
    overrides: SetOption = None,
    out: Annotated[
        Path | None, typer.Option(help="report folder (default: evaluate.out_dir)")
    ] = None,
    metrics: MetricsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Evaluate a model on the test split; log the report to its MLflow run."""
    from mmops.evaluation.metrics import flat_metrics
    from mmops.tracking.evaluate_run import tracked_evaluate

    params = load_command_params(params_file, overrides)
    report, run_id = tracked_evaluate(model, data, params, out)
    flat = flat_metrics(report)
    if metrics is not None:
        write_json(metrics, flat)
    quality, ablation, baseline = report.classification, report.ablation, report.baseline
    against = f"; {baseline.kind} baseline {baseline.test_accuracy:.4f}" if baseline else ""
    say(
        f"test accuracy {quality.accuracy:.4f}, macro-F1 {quality.macro_f1:.4f}; "
        f"image only {ablation.image_only:.4f}, text only {ablation.text_only:.4f}{against}; "
        f"run {run_id}"
    )
    if report.underfit is not None:
        say(f"underfit: {report.underfit.hint}")
    if as_json:
        typer.echo(json.dumps({"run_id": run_id, **flat}))


@command()
def zero_shot(
    data: Annotated[Path, typer.Option("--data", help="dataset directory (labels, test split)")],
    model: Annotated[
        str, typer.Option("--model", help="dual-encoder checkpoint (CLIP, SigLIP): folder or hub")
    ],
    params_file: ParamsOption = None,
    overrides: SetOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="folder of the model (model/) and its report (default: zero_shot.out_dir)"
        ),
    ] = None,
    metrics: MetricsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Classify from label prompts with a dual encoder: save it as a model, evaluate it."""
    from mmops.evaluation.evaluate import ZERO_SHOT_MODEL, evaluate_zero_shot
    from mmops.evaluation.metrics import flat_metrics

    params = load_command_params(params_file, overrides)
    out_dir = out or Path(params.zero_shot.out_dir)
    report = evaluate_zero_shot(data, model, params, out_dir)
    flat = flat_metrics(report)
    if metrics is not None:
        write_json(metrics, flat)
    quality, baseline = report.classification, report.baseline
    against = f"; {baseline.kind} baseline {baseline.test_accuracy:.4f}" if baseline else ""
    say(
        f"zero-shot test accuracy {quality.accuracy:.4f}, macro-F1 {quality.macro_f1:.4f}"
        f"{against}; model {out_dir / ZERO_SHOT_MODEL}"
    )
    if as_json:
        typer.echo(json.dumps({"model_dir": str(out_dir / ZERO_SHOT_MODEL), **flat}))


@command()
def export(
    data: Annotated[Path, typer.Option("--data", help="dataset directory (its test split)")],
    model: Annotated[str, typer.Option("--model", help="model folder, runs:/ or models:/ URI")],
    params_file: ParamsOption = None,
    overrides: SetOption = None,
    out: Annotated[
        Path | None, typer.Option(help="export folder (default: export.out_dir)")
    ] = None,
    metrics: MetricsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export to ONNX, quantize to INT8, gate INT8 against the torch model; log to MLflow."""
    from mmops.export.records import export_metrics
    from mmops.tracking.export_run import tracked_export

    params = load_command_params(params_file, overrides)
    report, run_id, model_uri = tracked_export(model, data, params, out)
    flat = export_metrics(report)
    if metrics is not None:
        write_json(metrics, flat)
    int8 = report.gates.int8
    verdict = "passed" if int8.passed else "rejected: " + "; ".join(int8.reasons)
    say(
        f"exported: serving {report.serving}; INT8 gate {verdict}; INT8 size "
        f"{report.size_ratio_int8_vs_fp32:.2f}x FP32; run {run_id}; model {model_uri}"
    )
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "run_id": run_id,
                    "model_uri": model_uri,
                    "serving": report.serving,
                    "int8_passed": int8.passed,
                    "int8_reasons": int8.reasons,
                    **flat,
                }
            )
        )


@command()
def predict(
    model: Annotated[str, typer.Option("--model", help="model folder, runs:/ or models:/ URI")],
    out: Annotated[Path, typer.Option("--out", help="JSONL file to write predictions to")],
    records: Annotated[
        Path | None,
        typer.Option("--input", help="JSONL records: id, text, image (base64 or a path)"),
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="a dataset directory instead of --input")
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="with --data: only this split (train, val, test)")
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="auto | int8 | fp32 | torch (default: predict.backend)")
    ] = None,
    params_file: ParamsOption = None,
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Predict a file of records or a dataset; bad records get an error line, not a crash."""
    from mmops.serving.batch import predict_to_file, read_records
    from mmops.serving.predictor import Predictor

    params = load_command_params(params_file, overrides)
    if (records is None) == (data is None):
        raise UserError(
            "give exactly one of --input and --data",
            "--input FILE.jsonl predicts records; --data DIR [--split S] predicts a dataset",
        )
    predictor = Predictor.load(model, backend or params.predict.backend, params.predict)
    if data is not None:
        from mmops.data.dataset import load_splits

        frame = load_splits(data, params)
        if split is not None:
            frame = frame[frame["split"] == split]
        rows = frame[["id", "image", "text"]].to_dict("records")
        summary = predict_to_file(predictor, rows, out, root=data)
    else:
        assert records is not None
        try:
            # Image paths in a records file are relative to the file.
            summary = predict_to_file(predictor, read_records(records), out, root=records.parent)
        except UnicodeDecodeError as exc:
            raise UserError(
                f"{records}: not text ({exc.reason} at byte {exc.start})",
                "--input takes JSONL: one JSON object per line, UTF-8",
            ) from None
    say(
        f"predicted {summary['records']} records ({summary['errors']} errors) with "
        f"{summary['model']} v{summary['version']} on {summary['backend']}: {out}"
    )
    if as_json:
        typer.echo(json.dumps(summary))
