"""The feedback stage as Prefect wiring: labelled events from the stream into a new data version,
a task the retrain flow can run first and a small flow to run it alone."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from mmops.config import Params, resolve_params
from mmops.data.snapshot import FeedbackRejected
from mmops.stream.feedback import collect_feedback
from mmops_flows.support import is_transient_error, mmops_logs_to_prefect


def _broker_hiccup(task: Any, run: Any, state: Any) -> bool:
    """Retry a broker that did not answer, never data that failed validation: a retry reads
    the same records and meets the same refusal."""
    error = state.result(raise_on_failure=False)
    if not isinstance(error, BaseException) or isinstance(error, FeedbackRejected):
        return False
    return is_transient_error(error) or bool(getattr(error, "retriable", False))


# Nothing is committed before the snapshot is versioned, so a retried run reads it all again.
@task(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=_broker_hiccup)
def feedback(params: Params) -> dict[str, Any]:
    """The summary of `mmops feedback`: snapshot, merged data, DVC versions, online accuracy."""
    return collect_feedback(params).to_dict()


@flow(name="feedback", log_prints=True)
def feedback_flow(params_file: str | None = None, overrides: list[str] | None = None) -> dict:
    """Labelled feedback from the stream into feedback.merged_dir, validated and versioned."""
    with mmops_logs_to_prefect():
        return feedback(resolve_params(params_file, overrides or []))
