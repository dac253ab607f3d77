"""Prefect-side helpers of the retrain flow (flows/retrain.py): retry policy, run naming, logs,
the run folder and the summary artifact, so the flow itself only wires stages."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mmops.data.validate import DatasetRejected
from mmops.environment import mlflow_client, tracking_uri
from mmops.local.stack import DEFAULT_MLFLOW_PORT, LOOPBACK

log = logging.getLogger(__name__)

# Errors that a retry can fix: the network or the tracking server, not the data or the code.
_TRANSIENT_NAMES = ("ConnectionError", "Timeout", "TimeoutError", "OperationalError")
_TRANSIENT_MLFLOW_CODES = ("TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED", "INTERNAL_ERROR")


def is_transient(state: Any) -> bool:
    """Whether a failed Prefect task state was a transient error worth a retry."""
    error = state.result(raise_on_failure=False)
    return is_transient_error(error) if isinstance(error, BaseException) else False


def is_transient_error(error: BaseException) -> bool:
    if isinstance(error, DatasetRejected):
        return False
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


def summary_markdown(result: dict[str, Any], metrics: dict[str, Any], table: str) -> str:
    """The run's Prefect artifact: evaluation summary and challenger versus champion."""
    gate = result["gate"]
    verdict = "passed" if gate["passed"] else "rejected: " + "; ".join(gate["reasons"])
    ablation = metrics.get("ablation", {})
    lines = [
        f"# {result['model']} v{result['version']}: "
        + ("promoted to champion" if result["promoted"] else "not promoted"),
        "",
        f"- gate: {verdict}",
        f"- champion now: v{result['champion']}",
        f"- data md5 {result['data_md5']}, training run {result['run_id']}",
        f"- serving artifact: {result['serving']}",
        "",
        "## Evaluation (test split)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {metrics['accuracy']:.4f} |",
        f"| macro-F1 | {metrics['macro_f1']:.4f} |",
        f"| image only | {ablation.get('image_only', float('nan')):.4f} |",
        f"| text only | {ablation.get('text_only', float('nan')):.4f} |",
        "",
        "## Challenger versus champion",
        "",
        table,
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
