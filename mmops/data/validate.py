"""Dataset validation: a GX suite on the manifest, plus image and cross-row checks."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pandas as pd

from mmops.config import Params
from mmops.data.dataset import (
    REQUIRED_COLUMNS,
    SPLITS,
    DatasetError,
    assign_splits,
    find_manifest,
    read_manifest,
)
from mmops.data.images import UNSAFE_PATH, ImageInfo, inspect_chunk, is_unsafe_path

log = logging.getLogger(__name__)

# Every check, in report order; the names are stable (tests, reports and alerts rely on them).
CHECKS = {
    "manifest": "the manifest exists and parses",
    "columns.required": "columns id, image, text and label exist",
    "types.id": "id values are strings",
    "types.image": "image values are strings",
    "types.text": "text values are strings",
    "types.label": "label values are strings",
    "types.split": "split values are strings",
    "types.group": "group values are strings",
    "id.not_null": "every row has an id",
    "id.non_empty": "ids are non-empty",
    "id.unique": "ids are unique",
    "label.not_null": "every row has a label",
    "label.in_set": "labels belong to validate.labels",
    "split.in_set": "split is train, val or test",
    "text.not_blank": "texts are not blank",
    "text.length": "text length is within validate.text_min_chars..text_max_chars",
    "text.missing_rate": "share of rows without text is at most data.max_missing_text_rate",
    "image.missing_rate": "share of rows without image is at most data.max_missing_image_rate",
    "image.path_relative": "image paths are relative, without '..'",
    "image.extension": "image paths end in .png, .jpg or .jpeg",
    "image.inside_dataset": "image files resolve inside the dataset directory",
    "image.exists": "image files exist",
    "image.file_size": "image files are at most validate.image.max_file_mb",
    "image.format": "image files are PNG or JPEG by content",
    "image.dimensions": "image sizes are within validate.image limits",
    "image.decodes": "image files decode completely",
    "classes.min_examples": "each class has at least validate.min_examples_per_class examples",
    "classes.in_train": "each class appears in the train split",
    "classes.balance": "largest / smallest class count is at most validate.max_class_imbalance",
    "splits.min_size": "each split has at least validate.min_split_size examples",
    "splits.leakage": "no (image content, text) pair appears in more than one split",
}
_PARALLEL_FROM = 2000
_MAX_LISTED = 20


@dataclass(frozen=True)
class CheckResult:
    name: str
    success: bool
    detail: str = ""
    ids: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    source: str = "mmops"

    @property
    def description(self) -> str:
        return CHECKS[self.name]

    def summary(self) -> str:
        """One line for a terminal: the detail plus the first offending ids and files."""
        parts = [self.detail] if self.detail else []
        for label, items in (("ids", self.ids), ("files", self.files)):
            if items:
                shown = ", ".join(items[:_MAX_LISTED])
                more = (
                    f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
                )
                parts.append(f"{label}: {shown}{more}")
        return "; ".join(parts)


@dataclass(frozen=True)
class ValidationReport:
    dataset: str
    manifest: str | None
    checks: tuple[CheckResult, ...]
    stats: dict[str, Any] = field(default_factory=dict)
    gx_result: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def success(self) -> bool:
        return all(c.success for c in self.checks)

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "manifest": self.manifest,
            "success": self.success,
            "failed_checks": [c.name for c in self.failed],
            "stats": self.stats,
            "checks": [{**asdict(c), "description": c.description} for c in self.checks],
        }

    def metrics(self) -> dict[str, Any]:
        """Flat figures for `dvc metrics` and MLflow."""
        flat = {
            "success": self.success,
            "checks_failed": len(self.failed),
            "checks_passed": len(self.checks) - len(self.failed),
        }
        for key, value in self.stats.items():
            if isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        return flat


def validate_dataset(root: Path | str, params: Params) -> ValidationReport:
    """Run every check on the dataset at `root` and report each result with its offending rows."""
    root = Path(root)
    try:
        manifest = find_manifest(root)
        frame = read_manifest(root)
    except DatasetError as exc:
        return ValidationReport(str(root), None, (CheckResult("manifest", False, str(exc)),))
    checks = [CheckResult("manifest", True, f"{len(frame)} rows in {manifest.name}")]
    gx_checks, gx_result = run_expectations(frame, params)
    checks += gx_checks
    stats: dict[str, Any] = {"rows": len(frame)}
    if set(REQUIRED_COLUMNS) <= set(frame.columns):
        images = inspect_images(root, frame["image"], params)
        checks += image_checks(images)
        checks += dataset_checks(frame, images, params, stats)
    order = list(CHECKS)
    checks.sort(key=lambda c: order.index(c.name))
    return ValidationReport(str(root), str(manifest), tuple(checks), stats, gx_result)


def build_expectations(columns: Iterable[str], params: Params) -> list:
    """The GX suite for a manifest with these columns, each expectation tagged with its check."""
    import great_expectations as gx

    e = gx.expectations
    v = params.validate
    columns = set(columns)
    expectations = [
        e.ExpectColumnToExist(column=c, meta={"check": "columns.required"})
        for c in REQUIRED_COLUMNS
    ]

    def add(column: str, check: str, expectation: type, **kwargs: Any) -> None:
        if column in columns:
            expectations.append(expectation(column=column, meta={"check": check}, **kwargs))

    for column in ("id", "image", "text", "label", "split", "group"):
        add(column, f"types.{column}", e.ExpectColumnValuesToBeOfType, type_="str")
    add("id", "id.not_null", e.ExpectColumnValuesToNotBeNull)
    add("id", "id.non_empty", e.ExpectColumnValueLengthsToBeBetween, min_value=1)
    add("id", "id.unique", e.ExpectColumnValuesToBeUnique)
    add("label", "label.not_null", e.ExpectColumnValuesToNotBeNull)
    if v.labels is not None:
        add("label", "label.in_set", e.ExpectColumnValuesToBeInSet, value_set=list(v.labels))
    add("split", "split.in_set", e.ExpectColumnValuesToBeInSet, value_set=list(SPLITS))
    add("text", "text.not_blank", e.ExpectColumnValuesToNotMatchRegex, regex=r"^\s*$")
    add(
        "text",
        "text.length",
        e.ExpectColumnValueLengthsToBeBetween,
        min_value=v.text_min_chars,
        max_value=v.text_max_chars,
    )
    add(
        "text",
        "text.missing_rate",
        e.ExpectColumnValuesToNotBeNull,
        mostly=1.0 - params.data.max_missing_text_rate,
    )
    add(
        "image",
        "image.missing_rate",
        e.ExpectColumnValuesToNotBeNull,
        mostly=1.0 - params.data.max_missing_image_rate,
    )
    add("image", "image.path_relative", e.ExpectColumnValuesToNotMatchRegex, regex=UNSAFE_PATH)
    add("image", "image.extension", e.ExpectColumnValuesToMatchRegex, regex=r"(?i)\.(?:png|jpe?g)$")
    return expectations


def run_expectations(frame: pd.DataFrame, params: Params) -> tuple[list[CheckResult], dict]:
    """Validate the manifest with Great Expectations; returns our checks and GX's raw result."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    context = gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        ),
    )
    batch = (
        context.data_sources.add_pandas("dataset")
        .add_dataframe_asset(name="manifest")
        .add_batch_definition_whole_dataframe("all_rows")
    )
    suite = context.suites.add(gx.ExpectationSuite(name="manifest"))
    for expectation in build_expectations(frame.columns, params):
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="manifest", data=batch, suite=suite)
    )
    result = definition.run(batch_parameters={"dataframe": frame}, result_format="COMPLETE")
    ids = frame["id"].map(str).tolist() if "id" in frame else None

    merged: dict[str, list] = {}
    for r in result.results:
        merged.setdefault(r.expectation_config.meta["check"], []).append(r)
    checks = []
    for name, results in merged.items():
        rows = sorted({i for r in results for i in r.result.get("unexpected_index_list") or []})
        details = [_describe_gx(r) for r in results if not r.success]
        checks.append(
            CheckResult(
                name,
                all(r.success for r in results),
                "; ".join(d for d in details if d),
                ids=tuple(ids[i] for i in rows) if ids else (),
                source="great_expectations",
            )
        )
    return checks, result.to_json_dict()


def _describe_gx(result: Any) -> str:
    info = result.exception_info or {}
    if info.get("raised_exception"):
        return f"could not evaluate: {info.get('exception_message')}"
    config = result.expectation_config
    column = config.kwargs.get("column")
    if config.type == "expect_column_to_exist":
        return f"missing column '{column}'"
    count = result.result.get("unexpected_count", 0)
    total = result.result.get("element_count", 0)
    values = result.result.get("partial_unexpected_list") or []
    shown = ", ".join(repr(x) for x in values[:5])
    return f"column '{column}': {count} of {total} rows" + (f" (e.g. {shown})" if shown else "")


def inspect_images(root: Path, paths: pd.Series, params: Params) -> dict[str, ImageInfo]:
    """Inspect each distinct, safely relative image path once, in parallel for large datasets."""
    relpaths = sorted({p for p in paths if isinstance(p, str) and p and not is_unsafe_path(p)})
    limits = params.validate.image
    workers = params.validate.workers or os.cpu_count() or 1
    if len(relpaths) < _PARALLEL_FROM or workers == 1:
        infos = inspect_chunk(str(root), relpaths, limits)
    else:
        size = -(-len(relpaths) // (workers * 8))
        chunks = [relpaths[i : i + size] for i in range(0, len(relpaths), size)]
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            parts = pool.map(
                inspect_chunk, [str(root)] * len(chunks), chunks, [limits] * len(chunks)
            )
            infos = [info for part in parts for info in part]
    return {info.path: info for info in infos}


def image_checks(images: dict[str, ImageInfo]) -> list[CheckResult]:
    problems: dict[str, list[ImageInfo]] = {}
    for info in images.values():
        if info.problem:
            problems.setdefault(info.problem, []).append(info)
    names = [
        n
        for n in CHECKS
        if n.startswith("image.")
        and n not in ("image.missing_rate", "image.path_relative", "image.extension")
    ]
    checks = []
    for name in names:
        bad = problems.get(name, [])
        detail = f"{len(bad)} files; first: {bad[0].path}: {bad[0].message}" if bad else ""
        checks.append(CheckResult(name, not bad, detail, files=tuple(i.path for i in bad)))
    return checks


def dataset_checks(
    frame: pd.DataFrame, images: dict[str, ImageInfo], params: Params, stats: dict[str, Any]
) -> list[CheckResult]:
    """Checks across rows: class counts and balance, split sizes, leakage between splits."""
    v = params.validate
    ids = frame["id"].map(str)
    splits = assign_splits(frame, params.data.split)
    labels = frame["label"].where(frame["label"].map(lambda x: isinstance(x, str)))
    counts = labels.value_counts()
    split_counts = splits[splits.isin(SPLITS)].value_counts()
    stats.update(
        classes=len(counts),
        class_counts={str(k): int(n) for k, n in counts.items()},
        split_sizes={s: int(split_counts.get(s, 0)) for s in SPLITS},
        missing_image_rate=round(float(frame["image"].isna().mean()), 6),
        missing_text_rate=round(float(frame["text"].isna().mean()), 6),
    )
    if "group" in frame:
        stats["groups"] = {str(k): int(n) for k, n in frame["group"].value_counts().items()}

    checks = []
    rare = counts[counts < v.min_examples_per_class]
    checks.append(
        CheckResult(
            "classes.min_examples",
            rare.empty,
            ", ".join(f"'{k}' has {n}" for k, n in rare.items())
            + (f" (need {v.min_examples_per_class})" if not rare.empty else ""),
        )
    )
    train_labels = set(labels[splits == "train"].dropna())
    missing = [str(k) for k in counts.index if k not in train_labels]
    checks.append(
        CheckResult(
            "classes.in_train",
            not missing,
            f"no train examples for {', '.join(missing)}" if missing else "",
        )
    )
    ratio = float(counts.max() / counts.min()) if len(counts) else 0.0
    stats["class_imbalance"] = round(ratio, 4)
    balanced = ratio <= v.max_class_imbalance
    checks.append(
        CheckResult(
            "classes.balance",
            balanced,
            ""
            if balanced
            else f"'{counts.idxmax()}' {counts.max()} vs '{counts.idxmin()}' {counts.min()}: "
            f"ratio {ratio:.1f} > {v.max_class_imbalance}",
        )
    )
    small = {
        s: int(split_counts.get(s, 0))
        for s in SPLITS
        if split_counts.get(s, 0) < getattr(v.min_split_size, s)
    }
    checks.append(
        CheckResult(
            "splits.min_size",
            not small,
            ", ".join(
                f"{s} has {n} (need {getattr(v.min_split_size, s)})" for s, n in small.items()
            ),
        )
    )
    checks.append(_leakage(frame, ids, splits, images))
    return checks


def _leakage(
    frame: pd.DataFrame, ids: pd.Series, splits: pd.Series, images: dict[str, ImageInfo]
) -> CheckResult:
    # Same image bytes under another name still leak, so pairs are keyed by content hash.
    # Values of the wrong type (a list, say) fail types.* and are left out: they are unhashable.
    sha = frame["image"].map(
        lambda p: images[p].sha256 if isinstance(p, str) and p in images else ""
    )
    text = frame["text"].map(lambda t: t if isinstance(t, str) else None)
    pairs = pd.DataFrame({"id": ids, "split": splits, "sha": sha, "text": text})
    pairs = pairs[(pairs["sha"] != "") & pairs["text"].notna() & pairs["split"].isin(SPLITS)]
    spread = pairs.groupby(["sha", "text"])["split"].transform("nunique")
    leaked = pairs[spread > 1]
    detail = ""
    if len(leaked):
        n_pairs = leaked.groupby(["sha", "text"]).ngroups
        detail = f"{n_pairs} (image, text) pairs in several splits, {len(leaked)} rows"
    return CheckResult("splits.leakage", leaked.empty, detail, ids=tuple(leaked["id"]))


class DatasetRejected(ValueError):
    """The dataset failed validation: nothing was trained and the registry is untouched."""

    def __init__(self, data_dir: str | Path, report: ValidationReport) -> None:
        failed = "; ".join(f"{c.name}: {c.summary()}" for c in report.failed)
        super().__init__(f"{data_dir}: not fit to train on ({len(report.failed)} checks): {failed}")
