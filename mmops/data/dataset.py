"""The dataset contract: a directory with one manifest (jsonl, csv or parquet) and its images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from mmops.config import Params, SplitRatios

MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv", "manifest.parquet")
REQUIRED_COLUMNS = ("id", "image", "text", "label")
OPTIONAL_COLUMNS = ("split", "group")
SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A dataset that cannot be read as the contract describes; the message names the file."""


def find_manifest(root: Path | str) -> Path:
    """The one manifest file of a dataset directory."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset directory not found")
    found = [root / name for name in MANIFEST_NAMES if (root / name).is_file()]
    if not found:
        raise DatasetError(f"{root}: no manifest (expected one of {', '.join(MANIFEST_NAMES)})")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DatasetError(f"{root}: several manifests ({names}); keep exactly one")
    return found[0]


def read_manifest(root: Path | str) -> pd.DataFrame:
    """The manifest as a DataFrame of Python objects, one row per example, nulls as None."""
    path = find_manifest(root)
    if path.suffix == ".jsonl":
        frame = pd.DataFrame(_read_jsonl(path), dtype=object)
    elif path.suffix == ".csv":
        # Every cell is read as text; an empty cell is a null (a missing modality for image/text).
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{path}: not valid CSV: {exc}") from None
    else:
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise DatasetError(f"{path}: not valid Parquet: {exc}") from None
    frame = frame.astype(object)
    return frame.where(frame.notna(), None).reset_index(drop=True)


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path} line {lineno}: invalid JSON: {exc.msg}") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{path} line {lineno}: expected a JSON object")
            records.append(record)
    return records


def hash_split(example_id: str, ratios: SplitRatios) -> str:
    """Deterministic split of one example from a hash of its id, independent of row order."""
    digest = hashlib.sha256(str(example_id).encode("utf-8")).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    if point < ratios.train:
        return "train"
    if point < ratios.train + ratios.val:
        return "val"
    return "test"


def assign_splits(frame: pd.DataFrame, ratios: SplitRatios) -> pd.Series:
    """Each row's split: its own `split` value where given, else the hash split of its id."""
    given = frame["split"] if "split" in frame else [None] * len(frame)
    return pd.Series(
        [
            s if isinstance(s, str) else hash_split(i, ratios)
            for i, s in zip(frame["id"], given, strict=True)
        ],
        index=frame.index,
        dtype=object,
        name="split",
    )


def load_splits(data_dir: Path | str, params: Params) -> pd.DataFrame:
    """The manifest with every row's split filled in (explicit or by hash of id)."""
    frame = read_manifest(data_dir)
    frame["split"] = assign_splits(frame, params.data.split)
    return frame


def split_rows(
    frame: pd.DataFrame, split: str, data_dir: Path | str, needed_by: str | None = None
) -> pd.DataFrame:
    """The rows of one split, re-indexed from 0; with `needed_by`, an empty split is an error."""
    rows = frame[frame["split"] == split].reset_index(drop=True)
    if needed_by and rows.empty:
        raise DatasetError(f"{data_dir}: the {split} split is empty; {needed_by} needs it")
    return rows
