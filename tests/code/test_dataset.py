from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from mmops.config import SplitRatios
from mmops.data.dataset import DatasetError, assign_splits, find_manifest, hash_split, read_manifest

RECORDS = [
    {"id": "a", "image": "images/a.png", "text": "What colour?", "label": "red", "split": "train"},
    {"id": "b", "image": None, "text": "NA", "label": "blue", "split": None},
    {"id": "c", "image": "images/c.png", "text": None, "label": "green", "split": "test"},
    {
        "id": "d",
        "image": "images/d.jpg",
        "text": 'a, "quoted"\nline',
        "label": "red",
        "split": None,
    },
]


def write_jsonl(root: Path, records: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_manifest(root: Path, fmt: str, records: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        return write_jsonl(root, records)
    path = root / f"manifest.{fmt}"
    frame = pd.DataFrame(records)
    if fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_formats_read_to_the_same_frame(tmp_path: Path, fmt: str) -> None:
    write_manifest(tmp_path / "jsonl", "jsonl", RECORDS)
    write_manifest(tmp_path / fmt, fmt, RECORDS)
    expected = read_manifest(tmp_path / "jsonl")
    frame = read_manifest(tmp_path / fmt)
    pd.testing.assert_frame_equal(frame, expected)
    assert frame.to_dict("records") == RECORDS


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_nulls_come_back_as_none(tmp_path: Path, fmt: str) -> None:
    write_manifest(tmp_path, fmt, RECORDS)
    frame = read_manifest(tmp_path)
    assert frame.loc[1, "image"] is None
    assert frame.loc[1, "split"] is None
    assert frame.loc[2, "text"] is None
    assert all(dtype.kind == "O" for dtype in frame.dtypes)


def test_csv_empty_cell_is_none_but_na_text_is_kept(tmp_path: Path) -> None:
    tmp_path.joinpath("manifest.csv").write_text(
        "id,image,text,label\n1,images/1.png,,red\n2,images/2.png,NA,red\n3,images/3.png,null,red\n"
    )
    frame = read_manifest(tmp_path)
    assert frame["text"].tolist() == [None, "NA", "null"]
    # Every CSV cell is text: an id that looks like a number stays a string.
    assert frame["id"].tolist() == ["1", "2", "3"]


def test_jsonl_missing_key_is_none_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    tmp_path.joinpath("manifest.jsonl").write_text('{"id": "a", "text": "x"}\n\n   \n{"id": "b"}\n')
    frame = read_manifest(tmp_path)
    assert frame["id"].tolist() == ["a", "b"]
    assert frame["text"].tolist() == ["x", None]


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, RECORDS[:2])
    with path.open("a") as f:
        f.write('{"id": "c", "image": \n')
    with pytest.raises(DatasetError, match=r"line 3: invalid JSON") as info:
        read_manifest(tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("line", ['["a", "b"]', '"just a string"', "42", "null"])
def test_non_object_json_line_errors(tmp_path: Path, line: str) -> None:
    path = write_jsonl(tmp_path, RECORDS[:1])
    with path.open("a") as f:
        f.write(line + "\n")
    with pytest.raises(DatasetError, match=r"line 2: expected a JSON object") as info:
        read_manifest(tmp_path)
    assert str(path) in str(info.value)


def test_bad_parquet_errors(tmp_path: Path) -> None:
    tmp_path.joinpath("manifest.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match="not valid Parquet"):
        read_manifest(tmp_path)


def test_no_manifest_names_the_dir(tmp_path: Path) -> None:
    tmp_path.joinpath("notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match="no manifest") as info:
        read_manifest(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_several_manifests_name_the_dir_and_files(tmp_path: Path) -> None:
    write_manifest(tmp_path, "jsonl", RECORDS)
    write_manifest(tmp_path, "csv", RECORDS)
    with pytest.raises(DatasetError, match="several manifests") as info:
        find_manifest(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "manifest.jsonl" in message
    assert "manifest.csv" in message


def test_missing_dir_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="not found") as info:
        read_manifest(missing)
    assert str(missing) in str(info.value)


def test_find_manifest_returns_the_one_file(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "parquet", RECORDS)
    assert find_manifest(tmp_path) == path


def test_hash_split_is_deterministic() -> None:
    ratios = SplitRatios()
    ids = [f"id-{i}" for i in range(200)]
    first = [hash_split(i, ratios) for i in ids]
    assert first == [hash_split(i, ratios) for i in reversed(ids)][::-1]
    assert set(first) == {"train", "val", "test"}


def test_hash_split_uses_the_first_eight_bytes_of_sha256() -> None:
    # dvc.lock and trained models depend on this mapping: changing it moves examples between splits.
    ratios = SplitRatios(0.5, 0.25, 0.25)
    for example_id in ["demo-000000", "demo-000001", "x", "", "Ünïcode"]:
        digest = hashlib.sha256(example_id.encode("utf-8")).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64
        expected = "train" if point < 0.5 else "val" if point < 0.75 else "test"
        assert hash_split(example_id, ratios) == expected


@pytest.mark.parametrize(
    "ratios", [SplitRatios(), SplitRatios(0.6, 0.3, 0.1), SplitRatios(0.5, 0.0, 0.5)]
)
def test_hash_split_proportions_follow_the_ratios(ratios: SplitRatios) -> None:
    n = 20_000
    counts = Counter(hash_split(f"example-{i}", ratios) for i in range(n))
    for split in ("train", "val", "test"):
        assert abs(counts[split] / n - getattr(ratios, split)) < 0.02, counts


def test_hash_split_edge_ratios() -> None:
    ids = [f"x{i}" for i in range(500)]
    assert {hash_split(i, SplitRatios(1.0, 0.0, 0.0)) for i in ids} == {"train"}
    assert {hash_split(i, SplitRatios(0.0, 0.0, 1.0)) for i in ids} == {"test"}


def test_assign_splits_keeps_given_values_and_hashes_the_rest(tmp_path: Path) -> None:
    write_manifest(tmp_path, "jsonl", RECORDS)
    frame = read_manifest(tmp_path)
    ratios = SplitRatios()
    splits = assign_splits(frame, ratios)
    assert splits.tolist() == ["train", hash_split("b", ratios), "test", hash_split("d", ratios)]
    assert splits.name == "split"
    assert splits.index.equals(frame.index)


def test_assign_splits_keeps_unknown_split_values() -> None:
    # Validation must see a bad value to report it, so it is not replaced by a hash split.
    frame = pd.DataFrame({"id": ["a", "b"], "split": ["dev", None]}, dtype=object)
    assert assign_splits(frame, SplitRatios()).tolist() == ["dev", hash_split("b", SplitRatios())]


def test_assign_splits_without_split_column_hashes_every_row() -> None:
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(50)]}, dtype=object)
    ratios = SplitRatios(0.5, 0.25, 0.25)
    assert assign_splits(frame, ratios).tolist() == [hash_split(i, ratios) for i in frame["id"]]
