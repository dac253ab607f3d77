"""Prefect-side helpers of the retrain flow (flows/retrain.py): retry policy, run naming, logs,
the run folder and the summary artifact, so the flow itself only wires stages."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mmops.data.validate import DatasetRejected
from mmops.environment import mlflow_client, tracking_uri
from mmops.evaluation.records import EvaluationReport
from mmops.evaluation.report import baseline_section, underfit_section, zero_shot_section
from mmops.local.stack import DEFAULT_MLFLOW_PORT, LOOPBACK
from mmops.tracking.gate import Verdict
from mmops.training.validation_gate import UnvalidatedDataError

log = logging.getLogger(__name__)

# Errors that a retry can fix: the network or the tracking server, not the data or the code.
_TRANSIENT_NAMES = ("ConnectionError", "Timeout", "TimeoutError", "OperationalError")
_TRANSIENT_MLFLOW_CODES = ("TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED", "INTERNAL_ERROR")


def is_transient(state: Any) -> bool:
    """Whether a failed Prefect task state was a transient error worth a retry."""
    error = state.result(raise_on_failure=False)
    return is_transient_error(error) if isinstance(error, BaseException) else False


def is_transient_error(error: BaseException) -> bool:
    if isinstance(error, DatasetRejected | UnvalidatedDataError):
        return False  # the data, not the network: a retry would meet the same refusal
    for cause in _chain(error):
        if isinstance(cause, ConnectionError | TimeoutError):
            return True
        if any(name in type(cause).__name__ for name in _TRANSIENT_NAMES):
            return True
        if getattr(cause, "error_code", None) in _TRANSIENT_MLFLOW_CODES:
            return True
    return False


# Backoff for the tracking server or network hiccups; anything else fails at once.
TRANSIENT: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [2, 10, 30],
    "retry_condition_fn": lambda task, run, state: is_transient(state),
}


def _chain(error: BaseException) -> list[BaseException]:
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def run_folder(out_dir: str | Path | None) -> str:
    """Where one flow run writes its model, report and export: a fresh timestamped folder."""
    if out_dir is not None:
        return str(out_dir)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return str(Path("runs") / stamp)


@dataclass(frozen=True)
class RetrainResult:
    """What one run of the flow did: the version it registered, the gate's verdict, the test
    figures and where the champion is now."""

    model: str
    version: str
    run_id: str
    data_md5: str
    promoted: bool
    verdict: Verdict
    evaluation: EvaluationReport
    serving: str
    champion: str | None

    def to_dict(self) -> dict[str, Any]:
        """What `mmops retrain --json` prints."""
        quality, baseline = self.evaluation.classification, self.evaluation.baseline
        underfit, zero_shot = self.evaluation.underfit, self.evaluation.zero_shot
        return {
            "model": self.model,
            "version": self.version,
            "run_id": self.run_id,
            "data_md5": self.data_md5,
            "promoted": self.promoted,
            "gate": {
                "passed": self.verdict.passed,
                "reasons": list(self.verdict.reasons),
                "p_value": self.verdict.p_value,
            },
            "accuracy": quality.accuracy,
            "macro_f1": quality.macro_f1,
            "baseline": baseline.to_dict() if baseline else None,
            "underfit": underfit.to_dict() if underfit else None,
            "zero_shot": zero_shot.to_dict() if zero_shot else None,
            "serving": self.serving,
            "champion": self.champion,
        }


def summary_markdown(result: RetrainResult) -> str:
    """The run's Prefect artifact: evaluation summary, baseline, underfit report (for a model
    near chance) and challenger versus champion."""
    verdict = result.verdict
    gate = "passed" if verdict.passed else "rejected: " + "; ".join(verdict.reasons)
    quality, ablation = result.evaluation.classification, result.evaluation.ablation
    lines = [
        f"# {result.model} v{result.version}: "
        + ("promoted to champion" if result.promoted else "not promoted"),
        "",
        f"- gate: {gate}",
        f"- champion now: v{result.champion}",
        f"- data md5 {result.data_md5}, training run {result.run_id}",
        f"- serving artifact: {result.serving}",
        "",
        "## Evaluation (test split)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {quality.accuracy:.4f} |",
        f"| macro-F1 | {quality.macro_f1:.4f} |",
        f"| image only | {ablation.image_only:.4f} |",
        f"| text only | {ablation.text_only:.4f} |",
        *underfit_section(result.evaluation.underfit),
        *baseline_section(result.evaluation.baseline, quality),
        *zero_shot_section(result.evaluation.zero_shot, quality),
        "",
        "## Challenger versus champion",
        "",
        verdict.table(),
    ]
    return "\n".join(lines) + "\n"


def name_flow_run(data_md5: str) -> None:
    """Name the current flow run after the data version it trains on, so the UI lists it."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, name=f"retrain data {data_md5[:12]} {stamp}")
    except Exception as error:  # a name is a convenience: never fail the run over it
        log.warning("could not name the flow run: %s", error)


@contextmanager
def mmops_logs_to_prefect() -> Iterator[None]:
    """Send the `mmops` loggers' records to the flow run's logs in the Prefect UI.

    The same as PREFECT_LOGGING_EXTRA_LOGGERS=mmops, but for every way the flow is started.
    """
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("mmops")
    if any(isinstance(h, APILogHandler) for h in logger.handlers):
        yield
        return
    handler = APILogHandler()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def run_url(run_id: str) -> str:
    """The MLflow UI page of a run: on the tracking server, or on the one `mmops up` starts."""
    base = tracking_uri()
    if not base.startswith(("http://", "https://")):
        base = f"http://{LOOPBACK}:{DEFAULT_MLFLOW_PORT}"
    experiment = mlflow_client().get_run(run_id).info.experiment_id
    return f"{base.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"


@contextmanager
def promotion_slot(model_name: str, timeout_s: float = 3600) -> Iterator[None]:
    """Hold the one slot of a Prefect global concurrency limit named after the model, so flow
    runs on any host gate and promote one at a time (the registry lease covers a manual
    `mmops promote`). The limit is created on first use; `strict` fails rather than run
    unguarded if it cannot be taken."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = f"mmops-promote-{model_name}"
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):  # another run created it first
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1)
                )
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
        yield
