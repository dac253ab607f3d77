"""The data gate of training: a passing validation report for the data's exact version, or an
override that the run records.

Reads validation.json (written by `mmops validate --out`) as plain JSON: importing the validation
code would bring Great Expectations onto the training machine.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The MLflow tag that says how a run's data was accepted: `passed` or `skipped`.
VALIDATION_TAG = "mmops.validation"


class UnvalidatedDataError(ValueError):
    """No passing validation report for the data's exact version: nothing was trained."""


@dataclass(frozen=True)
class DataValidation:
    """How training accepted its data: a passing report for its version, or the override."""

    status: str  # passed | skipped (allow_unvalidated)
    report: str  # the report checked, as an absolute path
    report_md5: str | None  # the data version the report records
    reason: str = ""  # when skipped: why the report did not admit the data

    def tags(self) -> dict[str, str]:
        """The record on a tracked run: the status, the report and the version it validated."""
        tags = {
            VALIDATION_TAG: self.status,
            f"{VALIDATION_TAG}.report": self.report,
            f"{VALIDATION_TAG}.data_md5": str(self.report_md5),
        }
        if self.reason:
            tags[f"{VALIDATION_TAG}.reason"] = self.reason
        return tags

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_validation(
    data_dir: Path | str,
    report: Path | str,
    allow_unvalidated: bool = False,
    data_md5: str | None = None,
) -> DataValidation:
    """Admit `data_dir` when `report` passed its exact data version; else raise
    UnvalidatedDataError, or with `allow_unvalidated` warn and return why it was skipped.

    `data_md5` is the data's DVC md5 when the caller has already hashed it.
    """
    from mmops.data.versioning import content_md5

    path = Path(report)
    md5 = data_md5 or content_md5(data_dir)
    saved, problem = _read_report(path, data_dir)
    if problem is None:
        problem = _verdict_problem(path, saved, md5, data_dir)
    recorded = saved.get("data_md5")
    validation = DataValidation(
        "skipped" if problem else "passed",
        str(path.resolve()),
        recorded if isinstance(recorded, str) else None,
        problem or "",
    )
    if problem and not allow_unvalidated:
        raise UnvalidatedDataError(problem)
    if problem:
        log.warning("training on data that did not pass validation (allowed): %s", problem)
    return validation


def _read_report(path: Path, data_dir: Path | str) -> tuple[dict[str, Any], str | None]:
    """The report's fields, or why there are none."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, f"no validation report at {path}: {_fix(data_dir, path)}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, f"{path}: not a readable validation report ({exc})"
    if not isinstance(saved, dict) or not isinstance(saved.get("success"), bool):
        return {}, f"{path}: not a validation report (no `success` verdict)"
    return saved, None


def _verdict_problem(
    path: Path, saved: dict[str, Any], md5: str, data_dir: Path | str
) -> str | None:
    recorded = saved.get("data_md5")
    if recorded != md5:
        # A report from before data versions were recorded has none: it vouches for nothing.
        version = recorded or "no data version"
        return f"{path} validated {version}, but {data_dir} is {md5}: {_fix(data_dir, path)}"
    if not saved["success"]:
        failed = ", ".join(str(name) for name in saved.get("failed_checks") or [])
        return f"{path}: data version {md5} failed validation ({failed})"
    return None


def _fix(data_dir: Path | str, path: Path) -> str:
    return f"run `mmops validate {data_dir} --out {path.parent}` first"
