"""The monthly retrain-and-evaluate flow: a recipe of mmops stages, with retries and a report.

data version -> validate -> train -> evaluate -> export -> register -> gate -> promote. Every
task is one mmops call. Tasks that talk to the tracking server retry with backoff on transient
errors; validation never retries: a bad dataset stops the run before training, and the champion
stays where it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from mmops import registry, tracking, versioning
from mmops.config import Params, resolve_params
from mmops.retrain import (
    DatasetRejected,
    is_transient,
    registration_tags,
    run_folder,
    summary_markdown,
)
from mmops.validate import validate_dataset

# Backoff for the tracking server or network hiccups; anything else fails at once.
TRANSIENT = {
    "retries": 3,
    "retry_delay_seconds": [2, 10, 30],
    "retry_condition_fn": lambda task, run, state: is_transient(state),
}


@task
def resolve_data_version(data_dir: str) -> dict[str, Any]:
    return versioning.data_version(data_dir).to_dict()


@task(retries=0)
def validate(data_dir: str, params: Params) -> dict[str, Any]:
    report = validate_dataset(data_dir, params)
    if not report.success:
        raise DatasetRejected(data_dir, report)
    return report.metrics()


# Train is where the GPU is: run this flow from a work pool on a GPU machine (README).
@task(**TRANSIENT)
def train(data_dir: str, params: Params, out: str) -> dict[str, Any]:
    run = tracking.tracked_train(data_dir, params, Path(out) / "train")
    return {"run_id": run.run_id, "model_uri": run.model_uri, "model_dir": str(run.model_dir)}


@task(**TRANSIENT)
def evaluate(model_dir: str, data_dir: str, params: Params, out: str) -> dict[str, Any]:
    metrics, _ = tracking.tracked_evaluate(model_dir, data_dir, params, Path(out) / "evaluate")
    return metrics


@task(**TRANSIENT)
def export(model_dir: str, data_dir: str, params: Params, out: str) -> dict[str, Any]:
    folder = Path(out) / "export"
    report, _, model_uri = tracking.tracked_export(model_dir, data_dir, params, folder)
    return {**report, "model_uri": model_uri}


@task(**TRANSIENT)
def register(model_uri: str, name: str, tags: dict[str, str]) -> str:
    return registry.register(model_uri, name, tags)


@task(**TRANSIENT)
def gate_and_promote(
    name: str, version: str, data_dir: str, params: Params, reason: str
) -> dict[str, Any]:
    verdict, promoted = registry.gate_and_promote(name, version, data_dir, params, reason)
    return {"verdict": verdict.to_dict(), "promoted": promoted, "table": verdict.table()}


@flow(name="retrain_and_evaluate", log_prints=True)
def retrain_and_evaluate(
    data_dir: str = "data/demo",
    params_file: str | None = None,
    overrides: list[str] | None = None,
    out_dir: str | None = None,
) -> dict[str, Any]:
    """Retrain on the data, evaluate, export, register, and promote only past the gate."""
    params = resolve_params(params_file, overrides or [])
    name = params.tracking.registered_model
    out = run_folder(out_dir)
    version_info = resolve_data_version(data_dir)
    validate(data_dir, params)
    trained = train(data_dir, params, out)
    metrics = evaluate(trained["model_dir"], data_dir, params, out)
    exported = export(trained["model_dir"], data_dir, params, out)
    tags = registration_tags(version_info, metrics, exported, trained["run_id"])
    version = register(exported["model_uri"], name, tags)
    decision = gate_and_promote(name, version, data_dir, params, reason="retrain flow: gate passed")
    result = {
        "model": name,
        "version": version,
        "run_id": trained["run_id"],
        "data_md5": version_info["md5"],
        "promoted": decision["promoted"],
        "gate": {k: decision["verdict"][k] for k in ("passed", "reasons", "p_value")},
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "serving": exported["serving"],
        "champion": registry.champion_version(name),
    }
    create_markdown_artifact(
        key="retrain-summary",
        markdown=summary_markdown(result, metrics, decision["table"]),
        description="Evaluation summary and challenger versus champion",
    )
    get_run_logger().info("v%s %s", version, "promoted" if decision["promoted"] else "not promoted")
    return result
