from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from mmops.data.versioning import data_version, recorded_md5


def dvc_dir_md5(root: Path) -> str:
    """DVC's directory hash: md5 of the sorted JSON listing of (relpath, md5) entries."""
    entries = sorted(
        (
            {
                "md5": hashlib.md5(p.read_bytes()).hexdigest(),
                "relpath": p.relative_to(root).as_posix(),
            }
            for p in root.rglob("*")
            if p.is_file()
        ),
        key=lambda e: tuple(e["relpath"].split("/")),
    )
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "manifest.jsonl").write_text('{"id": "a"}\n')
    (root / "images" / "a.png").write_bytes(b"\x89PNG fake")
    (root / "images" / "b.png").write_bytes(b"\x89PNG other")
    return root


def test_md5_is_dvcs_directory_hash(dataset: Path) -> None:
    version = data_version(dataset)
    assert version.md5 == dvc_dir_md5(dataset)
    assert version.nfiles == 3
    assert version.size == sum(p.stat().st_size for p in dataset.rglob("*") if p.is_file())
    assert version.path == str(dataset.resolve())


def test_md5_changes_with_content_and_names(dataset: Path) -> None:
    before = data_version(dataset).md5
    (dataset / "images" / "b.png").rename(dataset / "images" / "c.png")
    renamed = data_version(dataset).md5
    (dataset / "images" / "c.png").write_bytes(b"\x89PNG changed")
    assert len({before, renamed, data_version(dataset).md5}) == 3


def test_empty_directory_has_no_files(tmp_path: Path) -> None:
    assert data_version(tmp_path).nfiles == 0


def test_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such dataset"):
        data_version(tmp_path / "nowhere")


def test_untracked_data(dataset: Path) -> None:
    version = data_version(dataset)
    assert version.dvc_md5 is None
    assert version.tracked is False
    assert version.to_dict()["tracked"] is False


def test_dvc_file_record_is_read(dataset: Path) -> None:
    md5 = dvc_dir_md5(dataset)
    dvc_file = dataset.with_name("data.dvc")
    dvc_file.write_text(yaml.safe_dump({"outs": [{"md5": md5, "path": "data"}]}))
    version = data_version(dataset)
    assert version.dvc_md5 == md5
    assert version.tracked is True
    assert version.to_dict()["tracked"] is True


def test_dvc_lock_record_is_read(tmp_path: Path, dataset: Path) -> None:
    lock = {
        "schema": "2.0",
        "stages": {
            "other": {"outs": [{"path": "reports/x.json", "md5": "0" * 32}]},
            "demo_data": {"outs": [{"path": "data", "md5": "abc.dir"}]},
        },
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert recorded_md5(dataset.resolve()) == "abc.dir"
    assert data_version(dataset).tracked is False


def test_dvc_lock_without_the_path_records_nothing(tmp_path: Path, dataset: Path) -> None:
    lock = {"stages": {"other": {"outs": [{"path": "elsewhere", "md5": "abc.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert recorded_md5(dataset.resolve()) is None
