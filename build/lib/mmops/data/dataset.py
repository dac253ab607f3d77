"""The dataset contract: a directory with one manifest (jsonl, csv or parquet) and its images."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass
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
    frame = _read_frame(path).astype(object)
    if frame.shape[0] == 0:
        raise DatasetError(f"{path}: no rows; a manifest has one row per example")
    frame = frame.where(frame.notna(), None).reset_index(drop=True)
    _check_strings(path, frame)
    return frame


def _read_frame(path: Path) -> pd.DataFrame:
    if path.suffix == ".jsonl":
        return pd.DataFrame(_read_jsonl(path), dtype=object)
    if path.suffix == ".csv":
        # Every cell is read as text; an empty cell is a null (a missing modality for image/text).
        try:
            return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        except pd.errors.EmptyDataError:
            raise DatasetError(
                f"{path}: empty; its first line names the columns ({', '.join(REQUIRED_COLUMNS)})"
            ) from None
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{path}: not valid CSV: {exc}") from None
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DatasetError(f"{path}: not valid Parquet: {exc}") from None


# A NUL byte fails every file call on a path, and a lone surrogate every UTF-8 encoding (hashing
# ids for the split, writing reports): neither belongs in a manifest.
_BAD_CHARACTER = re.compile("[\x00\ud800-\udfff]")


def _check_strings(path: Path, frame: pd.DataFrame) -> None:
    for column in frame.columns:
        for row, value in enumerate(frame[column], start=1):
            if isinstance(value, str) and (found := _BAD_CHARACTER.search(value)):
                what = "a NUL byte" if found.group() == "\0" else "an unpaired surrogate"
                raise DatasetError(f"{path} row {row}, field {column!r}: {what} in {value!r:.80}")


def _read_jsonl(path: Path) -> list[dict]:
    try:
        with path.open(encoding="utf-8") as lines:
            return [
                record
                for lineno, line in enumerate(lines, start=1)
                if (record := _read_record(path, lineno, line)) is not None
            ]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text: {exc}") from None


def _read_record(path: Path, lineno: int, line: str) -> dict | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line, parse_int=_parse_int)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else exc
        raise DatasetError(f"{path} line {lineno}: invalid JSON: {message}") from None
    if not isinstance(record, dict):
        raise DatasetError(f"{path} line {lineno}: expected a JSON object")
    for key, value in record.items():
        if (long := _long_int(value)) is not None:
            raise DatasetError(
                f"{path} line {lineno}, field {key!r}: a {long.digits}-digit integer, longer "
                f"than Python reads ({sys.get_int_max_str_digits()} digits); write ids and labels "
                "as strings"
            )
    return record


@dataclass(frozen=True)
class _LongInt:
    """An integer literal past Python's int-from-text limit, kept so the error names its field."""

    digits: int


def _parse_int(literal: str) -> int | _LongInt:
    try:
        return int(literal)
    except ValueError:  # over sys.get_int_max_str_digits(), 4300 digits by default
        return _LongInt(len(literal.lstrip("-")))


def _long_int(value: object) -> _LongInt | None:
    stack = [value]  # a loop, not recursion: JSON nests deeper than Python's stack
    while stack:
        item = stack.pop()
        if isinstance(item, _LongInt):
            return item
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


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
