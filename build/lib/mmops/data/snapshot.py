"""Feedback snapshots on disk: written in the dataset contract, validated, merged into the
current data, swapped in whole, and versioned with DVC."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from mmops.config import Params
from mmops.data.checks import CHECKS
from mmops.data.dataset import read_manifest
from mmops.data.feedback import FeedbackState, Merge, merge_rows
from mmops.data.images import is_unsafe_path
from mmops.data.validate import ValidationReport, validate_dataset
from mmops.data.validation_report import write_report
from mmops.data.versioning import DataVersion, content_md5, data_version

MANIFEST = "manifest.jsonl"
PROVENANCE = "feedback.json"  # in each snapshot: where its rows came from, what was rejected
MERGE_SUMMARY = "merge.json"  # in the merged data: what came from where
# In each snapshot: what the next run needs (FeedbackState), versioned with the data it goes
# with, so a run on another machine (after `dvc pull`) carries on where the last one stopped.
STATE_FILE = "state.json"
REJECTED = ".rejected"  # in feedback.out_dir: snapshots that failed validation, with the report
SNAPSHOT_NAME = re.compile(r"^\d{8}T\d{6}Z(?:-\d+)?$")
# A snapshot is checked row by row; class counts, split sizes and leakage are properties of the
# data it joins, checked on the merged data.
ROW_CHECKS = tuple(
    name
    for name in CHECKS
    if not name.startswith(("classes.", "splits.")) and not name.endswith(".missing_rate")
)


class FeedbackError(RuntimeError):
    """Feedback that cannot be written or versioned as asked; the message says what to do."""


class FeedbackRejected(ValueError):
    """Data that failed validation; nothing was merged and no offset was committed."""

    def __init__(self, message: str, report: ValidationReport) -> None:
        super().__init__(message)
        self.report = report


def snapshot_name(now: datetime, out_dir: Path) -> str:
    """A new snapshot's folder name: the UTC time, with a counter if that name is taken."""
    base = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    name, n = base, 1
    while (out_dir / name).exists() or (out_dir / REJECTED / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def snapshot_folders(out_dir: Path) -> list[Path]:
    """The published snapshots, oldest first."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if p.is_dir() and SNAPSHOT_NAME.match(p.name)]
    return sorted(found, key=_order)


def _order(folder: Path) -> tuple[str, int]:
    stamp, _, n = folder.name.partition("-")
    return stamp, int(n or 1)


def write_snapshot(
    folder: Path,
    records: Sequence[tuple[dict[str, Any], bytes | None]],
    provenance: Mapping[str, Any],
    state: FeedbackState,
) -> Path:
    """Write records and their images as a dataset (manifest.jsonl + images/) at `folder`, with
    the provenance of its rows and the state the next run starts from."""
    if folder.exists():
        shutil.rmtree(folder)  # an earlier run's leftover that never got published
    (folder / "images").mkdir(parents=True)
    with (folder / MANIFEST).open("w", encoding="utf-8") as manifest:
        for record, image in records:
            if image is not None:
                (folder / record["image"]).write_bytes(image)
            manifest.write(json.dumps(record, ensure_ascii=False) + "\n")
    (folder / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    (folder / STATE_FILE).write_text(json.dumps(state.to_dict()) + "\n")
    return folder


def check(
    folder: Path, params: Params, what: str, checks: Sequence[str] | None = None
) -> ValidationReport:
    """Validate `folder`; raise FeedbackRejected naming each failed check (of `checks`, default
    all), its ids, files and the events behind those files."""
    report = validate_dataset(folder, params)
    failed = [c for c in report.failed if checks is None or c.name in checks]
    if failed:
        images = _image_ids(folder)
        parts = []
        for result in failed:
            events = sorted({images[f] for f in result.files if f in images})
            named = f"; events: {', '.join(events[:20])}" if events else ""
            parts.append(f"{result.name}: {result.summary()}{named}")
        checks_failed = f"{len(failed)} check{'s' if len(failed) > 1 else ''} failed"
        raise FeedbackRejected(
            f"{what}: not fit to merge ({checks_failed}): " + " | ".join(parts), report
        )
    return report


def _image_ids(folder: Path) -> dict[str, str]:
    try:
        frame = read_manifest(folder)
    except ValueError:
        return {}
    return {str(p): str(i) for p, i in zip(frame["image"], frame["id"], strict=True) if p}


def reject(folder: Path, out_dir: Path, name: str, error: FeedbackRejected) -> Path:
    """Move a snapshot that failed validation (or whose merge did) to out_dir/.rejected/<name>/,
    with the failed validation's report and the error beside it."""
    dest = out_dir / REJECTED / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(folder), dest)
    write_report(error.report, dest.with_name(f"{name}.validation"))
    dest.with_name(f"{name}.error.txt").write_text(f"{error}\n")
    return dest


def write_merged(
    dest: Path,
    base_dir: Path,
    base: pd.DataFrame,
    snapshots: Sequence[tuple[str, Path]],
    split: str,
) -> Merge:
    """The base rows (their splits as given) plus the rows of each (name, folder) snapshot,
    oldest first, written as one dataset at `dest` with merge.json saying what came from where.
    Images are hard links where the file system allows (nothing rewrites an image in place),
    else copies."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    records = [(name, read_manifest(folder).to_dict("records")) for name, folder in snapshots]
    merge = merge_rows(base.to_dict("records"), records, split)
    roots = {"base": base_dir, **dict(snapshots)}
    with (dest / MANIFEST).open("w", encoding="utf-8") as manifest:
        for row in merge.rows:
            if row.image_from is not None:
                _place(roots[row.source], row.image_from, dest, row.record["image"])
            line = json.dumps(_plain(row.record), ensure_ascii=False, default=_scalar)
            manifest.write(line + "\n")
    summary = {
        "base": {"path": str(base_dir), "md5": content_md5(base_dir), "rows": merge.base_rows},
        "split": split,
        "rows": len(merge.rows),
        "sources": dict(merge.sources()),
        "snapshots": [vars(s) for s in merge.snapshots],
        "feedback_ids": {
            name: [r.record["id"] for r in merge.rows if r.source == name] for name, _ in snapshots
        },
    }
    (dest / MERGE_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return merge


def _place(root: Path, relpath: str, dest: Path, target: str) -> None:
    """Link or copy root/relpath to dest/target; a path that leaves its dataset is not copied,
    so validation of the merged data names it."""
    if not isinstance(relpath, str) or is_unsafe_path(relpath) or is_unsafe_path(target):
        return
    real_root = os.path.realpath(root)
    source = os.path.realpath(os.path.join(real_root, relpath))
    out = dest / target
    if not source.startswith(real_root + os.sep) or not os.path.isfile(source) or out.exists():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, out)
    except OSError:
        shutil.copyfile(source, out)


def _scalar(value: Any) -> Any:
    """numpy scalars (a Parquet manifest's extra columns) as plain Python values."""
    return value.item() if hasattr(value, "item") else str(value)


def _plain(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record as JSON: pandas' NaN (a column absent from some rows) as null."""
    return {k: None if isinstance(v, float) and v != v else v for k, v in record.items()}


def publish(
    params: Params,
    name: str,
    records: Sequence[tuple[dict[str, Any], bytes | None]],
    provenance: Mapping[str, Any],
    state: FeedbackState,
    base_dir: Path,
    base: pd.DataFrame,
) -> tuple[Path, Merge]:
    """Write the snapshot, validate it, merge it with every earlier snapshot into the base
    data, validate the merge, then swap both in. A failed validation moves the snapshot to
    .rejected/ and leaves the merged data as it was."""
    cfg = params.feedback
    out_dir, merged_dir = Path(cfg.out_dir), Path(cfg.merged_dir)
    incoming = out_dir / f".incoming-{name}"
    write_snapshot(incoming, records, provenance, state)
    merged_tmp = merged_dir.with_name(f".{merged_dir.name}.incoming")
    try:
        check(incoming, params, f"snapshot {name}", ROW_CHECKS)
        folders = [(p.name, p) for p in snapshot_folders(out_dir)]
        merge = write_merged(merged_tmp, base_dir, base, [*folders, (name, incoming)], cfg.split)
        check(merged_tmp, params, f"{merged_dir} merged with snapshot {name}")
    except FeedbackRejected as error:
        shutil.rmtree(merged_tmp, ignore_errors=True)
        where = reject(incoming, out_dir, name, error)
        message = f"{error}; the snapshot and its validation report are in {where.parent}"
        raise FeedbackRejected(message, error.report) from None
    final = out_dir / name
    incoming.rename(final)
    swap_in(merged_tmp, merged_dir)
    return final, merge


def swap_in(incoming: Path, target: Path) -> None:
    """Replace `target` with `incoming` (both folders); `target` is never left half-written."""
    old = target.with_name(f".{target.name}.previous")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    incoming.rename(target)
    if old.exists():
        shutil.rmtree(old)


def dvc_root(path: Path) -> Path | None:
    """The DVC repository that `path` lies in (a folder with `.dvc/` at or above it)."""
    for folder in [path.resolve(), *path.resolve().parents]:
        if (folder / ".dvc").is_dir():
            return folder
    return None


def require_dvc(*paths: Path) -> Path:
    """The one DVC repository holding every path; FeedbackError when there is none."""
    roots = {dvc_root(p) for p in paths}
    if None in roots or len(roots) != 1:
        where = ", ".join(str(p) for p in paths)
        raise FeedbackError(
            f"{where}: not inside one DVC repository (no .dvc folder at or above "
            f"{Path.cwd() if None in roots else 'each'}); run `dvc init` at the project root, "
            "or pass --no-dvc to write snapshots without versioning them"
        )
    return next(iter(roots))  # type: ignore[arg-type]


def dvc_add(root: Path, paths: Sequence[Path]) -> dict[str, DataVersion]:
    """`dvc add` the paths (cached, a .dvc file beside each); each one's data version after."""
    local = Path(sys.executable).with_name("dvc")
    dvc = str(local) if local.is_file() else shutil.which("dvc")
    if dvc is None:
        raise FeedbackError("dvc: not installed (it comes with mmops; is the venv active?)")
    rels = [str(p.resolve().relative_to(root)) for p in paths]
    done = subprocess.run([dvc, "add", "-q", *rels], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise FeedbackError(f"dvc add {' '.join(rels)} failed: {' '.join(output)}")
    versions = {str(p): data_version(p) for p in paths}
    for path, version in versions.items():
        if not version.tracked:
            raise FeedbackError(f"{path}: dvc add ran but DVC records {version.dvc_md5}")
    return versions


def dvc_files(paths: Sequence[Path]) -> list[str]:
    """What `dvc add` wrote for `paths` and git should record: .dvc files and .gitignores."""
    files = [str(p.with_name(p.name + ".dvc")) for p in paths]
    ignores = sorted(
        {str(p.parent / ".gitignore") for p in paths if (p.parent / ".gitignore").is_file()}
    )
    return files + ignores


def load_state(out_dir: Path) -> FeedbackState:
    """The state the latest published snapshot left; empty before the first."""
    folders = snapshot_folders(out_dir)
    path = folders[-1] / STATE_FILE if folders else None
    if path is None or not path.is_file():
        return FeedbackState()
    try:
        return FeedbackState.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as error:
        raise FeedbackError(
            f"{path}: unreadable ({error}); restore it with `dvc checkout`"
        ) from None
