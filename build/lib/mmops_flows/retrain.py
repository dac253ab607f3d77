"""The monthly retrain-and-evaluate flow: a recipe of mmops stages, with retries and a report.

data version -> validate -> [search] -> train -> evaluate -> export -> register -> gate -> promote.
Every task is one mmops call; the search runs when train.search.enabled, and the registered model
is trained with its best values. Tasks that talk to the tracking server retry with backoff on
transient errors; validation never retries: a bad dataset stops the run before training, and the
champion stays where it was. Search and training read the run's own validation report, so they
take only the data version it passed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.schedules import Cron

from mmops.config import Params, resolve_params
from mmops.data.dataset import MANIFEST_NAMES
from mmops.data.validate import DatasetRejected, validate_dataset
from mmops.data.validation_report import REPORT_FILE, write_report
from mmops.data.versioning import data_version
from mmops.evaluation.records import EvaluationReport
from mmops.export.records import ExportReport
from mmops.tracking import registry
from mmops.tracking.evaluate_run import tracked_evaluate
from mmops.tracking.export_run import tracked_export
from mmops.tracking.gate import Verdict
from mmops.tracking.orphans import close_orphaned_runs
from mmops.tracking.search_space import with_overrides
from mmops.tracking.train_run import tracked_train
from mmops.tracking.tune import SearchResult, record_search, tune
from mmops_flows.feedback import feedback
from mmops_flows.support import (
    TRANSIENT,
    RetrainResult,
    mmops_logs_to_prefect,
    name_flow_run,
    promotion_slot,
    run_folder,
    run_url,
    summary_markdown,
)

# Each stage's limit; a hung stage fails the run instead of holding its worker for ever.
MINUTE, HOUR = 60, 3600


@task(timeout_seconds=30 * MINUTE)
def with_labelled_feedback(params: Params, data_dir: str) -> str:
    """Run the feedback stage; the merged data when there is any, else `data_dir`."""
    feedback(params)
    merged = Path(params.feedback.merged_dir)
    return str(merged) if any((merged / n).is_file() for n in MANIFEST_NAMES) else data_dir


def resolve_data_version(data_dir: str) -> dict[str, Any]:
    return data_version(data_dir).to_dict()


@task(retries=0, timeout_seconds=2 * HOUR)
def validate(data_dir: str, params: Params, out: str) -> str:
    """The path of the run's validation report, which search and training check the data by."""
    report = validate_dataset(data_dir, params)
    write_report(report, Path(out) / "validate")
    if not report.success:
        raise DatasetRejected(data_dir, report)
    return str(Path(out) / "validate" / REPORT_FILE)


# Search and train are where the GPU is: run this flow from a work pool on a GPU machine (README).
@task(**TRANSIENT, timeout_seconds=24 * HOUR)
def search(data_dir: str, params: Params, out: str, validation_report: str) -> SearchResult:
    return tune(data_dir, params, out_dir=Path(out) / "search", validation_report=validation_report)


@task(**TRANSIENT, timeout_seconds=24 * HOUR)
def train(
    data_dir: str,
    params: Params,
    out: str,
    searched: SearchResult | None = None,
    validation_report: str | None = None,
) -> dict[str, Any]:
    """Train; a search's best values and parent run are recorded on the training run."""
    run = tracked_train(data_dir, params, Path(out) / "train", validation_report=validation_report)
    if searched is not None:
        record_search(run.run_id, searched)
    return {"run_id": run.run_id, "model_uri": run.model_uri, "model_dir": str(run.model_dir)}


@task(**TRANSIENT, timeout_seconds=2 * HOUR)
def evaluate(model_dir: str, data_dir: str, params: Params, out: str) -> EvaluationReport:
    report, _ = tracked_evaluate(model_dir, data_dir, params, Path(out) / "evaluate")
    return report


@task(**TRANSIENT, timeout_seconds=2 * HOUR)
def export(model_dir: str, data_dir: str, params: Params, out: str) -> tuple[ExportReport, str]:
    """The export report, and the URI of the serving model logged to the training run."""
    report, _, model_uri = tracked_export(model_dir, data_dir, params, Path(out) / "export")
    return report, model_uri


@task(**TRANSIENT, timeout_seconds=15 * MINUTE)
def register(model_uri: str, name: str, tags: dict[str, str]) -> str:
    return registry.register(model_uri, name, tags)


@task(**TRANSIENT, timeout_seconds=HOUR)
def gate_and_promote(
    name: str, version: str, data_dir: str, params: Params, evaluation: EvaluationReport
) -> tuple[Verdict, bool]:
    """The gate, against the champion and the baselines the evaluate stage measured (classical
    and, with a dual encoder, zero-shot); one flow run at a time per model, across hosts."""
    with promotion_slot(name):
        return registry.gate_and_promote(
            name,
            version,
            data_dir,
            params,
            "retrain flow: gate passed",
            evaluation.baseline,
            evaluation.zero_shot,
        )


@flow(name="retrain_and_evaluate", log_prints=True)
def retrain_and_evaluate(
    data_dir: str = "data/demo",
    params_file: str | None = None,
    overrides: list[str] | None = None,
    out_dir: str | None = None,
    trigger: str = "manual",
    reason: str | None = None,
    with_feedback: bool = False,
) -> RetrainResult:
    """Retrain on the data, evaluate, export, register, and promote only past the gate.

    `trigger` says what started the run (manual, schedule, or drift with the alarm as `reason`);
    the registered version records both. `with_feedback` first turns the stream's labelled
    events into a new data version (`mmops feedback`) and trains on the merged data."""
    registry.check_trigger(trigger)  # before any work: the registration would refuse it
    with mmops_logs_to_prefect():
        params = resolve_params(params_file, overrides or [])
        data_dir = with_labelled_feedback(params, data_dir) if with_feedback else data_dir
        close_orphaned_runs(params)  # runs an earlier, killed flow left RUNNING
        name = params.tracking.registered_model
        out = run_folder(out_dir)
        version_info = resolve_data_version(data_dir)
        name_flow_run(version_info["md5"])
        report = validate(data_dir, params, out)
        searched = search(data_dir, params, out, report) if params.train.search.enabled else None
        if searched is not None:  # the registered model is trained with the search's best
            params = with_overrides(params, searched.best_overrides)
        trained = train(data_dir, params, out, searched, report)
        create_link_artifact(
            run_url(trained["run_id"]),
            link_text=f"MLflow run {trained['run_id']}",
            key="mlflow-run",
            description="The training run: parameters, curves, model, evaluation and export",
        )
        evaluation = evaluate(trained["model_dir"], data_dir, params, out)
        exported, model_uri = export(trained["model_dir"], data_dir, params, out)
        tags = registry.registration_tags(
            version_info, evaluation.classification, exported, trained["run_id"], trigger, reason
        )
        version = register(model_uri, name, tags)
        verdict, promoted = gate_and_promote(name, version, data_dir, params, evaluation)
        result = RetrainResult(
            model=name,
            version=version,
            run_id=trained["run_id"],
            data_md5=version_info["md5"],
            promoted=promoted,
            verdict=verdict,
            evaluation=evaluation,
            serving=exported.serving,
            champion=registry.champion_version(name),
        )
        create_markdown_artifact(
            key="retrain-summary",
            markdown=summary_markdown(result),
            description="Evaluation summary and challenger versus champion",
        )
        get_run_logger().info("v%s %s", version, "promoted" if promoted else "not promoted")
        return result


def serve_schedule(
    data_dir: str, params: Params, params_file: str | None, overrides: list[str]
) -> None:
    """Serve this flow as a deployment on the cron schedule in params.yaml, until interrupted."""
    cfg = params.schedule
    retrain_and_evaluate.serve(
        name=cfg.name,
        schedule=Cron(cfg.cron, timezone=cfg.timezone),
        parameters={
            "data_dir": data_dir,
            "params_file": params_file,
            "overrides": overrides,
            "trigger": "schedule",  # a drift-started run passes its own
        },
        pause_on_shutdown=False,
    )
