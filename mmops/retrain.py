"""Plain helpers of the retrain flow (flows/retrain.py), kept here so the flow only wires stages."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mmops.validate import ValidationReport


class DatasetRejected(ValueError):
    """The dataset failed validation: nothing was trained and the registry is untouched."""

    def __init__(self, data_dir: str | Path, report: ValidationReport) -> None:
        failed = "; ".join(f"{c.name}: {c.summary()}" for c in report.failed)
        super().__init__(f"{data_dir}: not fit to train on ({len(report.failed)} checks): {failed}")


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


def registration_tags(
    data_version: dict[str, Any], metrics: dict[str, Any], export: dict[str, Any], run_id: str
) -> dict[str, str]:
    """Tags of a new model version: data version, git commit, key metrics, export verdict."""
    int8 = export["gates"]["int8"]
    return {
        "data.md5": str(data_version["md5"]),
        "data.dvc_md5": str(data_version.get("dvc_md5")),
        "git.commit": str(data_version.get("git_commit")),
        "train.run_id": run_id,
        "test.accuracy": f"{metrics['accuracy']:.6f}",
        "test.macro_f1": f"{metrics['macro_f1']:.6f}",
        "export.serving": str(export["serving"]),
        "export.int8_passed": str(int8["passed"]),
        "export.int8_reasons": ("; ".join(int8["reasons"]) or "none")[:4900],
    }


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
