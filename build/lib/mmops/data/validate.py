"""Dataset validation: a GX suite on the manifest, plus image and cross-row checks."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pandas as pd

from mmops.config import Params, ValidateConfig
from mmops.data.checks import CHECKS, CheckResult
from mmops.data.dataset import (
    REQUIRED_COLUMNS,
    SPLITS,
    DatasetError,
    assign_splits,
    find_manifest,
    read_manifest,
)
from mmops.data.expectations import run_expectations
from mmops.data.images import ImageInfo, inspect_chunk, is_unsafe_path
from mmops.data.versioning import content_md5

log = logging.getLogger(__name__)

_PARALLEL_FROM = 2000


@dataclass(frozen=True)
class ValidationReport:
    dataset: str
    manifest: str | None
    checks: tuple[CheckResult, ...]
    stats: dict[str, Any] = field(default_factory=dict)
    gx_result: dict[str, Any] = field(default_factory=dict, repr=False)
    # The DVC md5 of what was validated: training takes only data of this exact version.
    data_md5: str | None = None

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
            "data_md5": self.data_md5,
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
    # Hashed before any check reads a file: data changed while it was checked then differs from
    # the recorded version, and training refuses it.
    md5 = content_md5(root) if root.is_dir() else None
    try:
        manifest = find_manifest(root)
        frame = read_manifest(root)
    except DatasetError as exc:
        failed = (CheckResult("manifest", False, str(exc)),)
        return ValidationReport(str(root), None, failed, data_md5=md5)
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
    return ValidationReport(str(root), str(manifest), tuple(checks), stats, gx_result, md5)


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
    return [
        *_class_checks(counts, labels, splits, params.validate, stats),
        _split_size_check(split_counts, params.validate),
        _leakage(frame, ids, splits, images),
    ]


def _class_checks(
    counts: pd.Series,
    labels: pd.Series,
    splits: pd.Series,
    v: ValidateConfig,
    stats: dict[str, Any],
) -> list[CheckResult]:
    rare = counts[counts < v.min_examples_per_class]
    enough = CheckResult(
        "classes.min_examples",
        rare.empty,
        ", ".join(f"'{k}' has {n}" for k, n in rare.items())
        + (f" (need {v.min_examples_per_class})" if not rare.empty else ""),
    )
    train_labels = set(labels[splits == "train"].dropna())
    missing = [str(k) for k in counts.index if k not in train_labels]
    in_train = CheckResult(
        "classes.in_train",
        not missing,
        f"no train examples for {', '.join(missing)}" if missing else "",
    )
    ratio = float(counts.max() / counts.min()) if len(counts) else 0.0
    stats["class_imbalance"] = round(ratio, 4)
    balanced = ratio <= v.max_class_imbalance
    balance = CheckResult(
        "classes.balance",
        balanced,
        ""
        if balanced
        else f"'{counts.idxmax()}' {counts.max()} vs '{counts.idxmin()}' {counts.min()}: "
        f"ratio {ratio:.1f} > {v.max_class_imbalance}",
    )
    return [enough, in_train, balance]


def _split_size_check(split_counts: pd.Series, v: ValidateConfig) -> CheckResult:
    small = {
        s: int(split_counts.get(s, 0))
        for s in SPLITS
        if split_counts.get(s, 0) < getattr(v.min_split_size, s)
    }
    return CheckResult(
        "splits.min_size",
        not small,
        ", ".join(f"{s} has {n} (need {getattr(v.min_split_size, s)})" for s, n in small.items()),
    )


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
