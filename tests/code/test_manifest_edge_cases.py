"""Manifests that once crashed the reader: each is now a failed check or a clean error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmops.cli import app
from mmops.config import Params
from mmops.data.checks import CheckResult
from mmops.data.dataset import DatasetError, read_manifest
from mmops.data.images import inspect_image
from mmops.data.validate import validate_dataset

runner = CliRunner()
HUGE = "9" * 5000  # past Python's 4300-digit limit on int <-> text conversion
ROW = {"id": "a", "image": "images/a.png", "text": "a red circle", "label": "red"}


def jsonl_with(line: str) -> str:
    return json.dumps(ROW) + "\n" + line + "\n"


# name: (manifest file, its content, what the error must name)
CASES = {
    "empty-csv": ("manifest.csv", "", ["manifest.csv", "empty"]),
    "blank-csv": ("manifest.csv", "\n\n", ["manifest.csv", "empty"]),
    "header-only-csv": ("manifest.csv", "id,image,text,label\n", ["manifest.csv", "no rows"]),
    "empty-jsonl": ("manifest.jsonl", "", ["manifest.jsonl", "no rows"]),
    "blank-jsonl": ("manifest.jsonl", "\n \n", ["manifest.jsonl", "no rows"]),
    "nul-in-csv-path": (
        "manifest.csv",
        "id,image,text,label\na,images/a.png,t,red\nb,images/b\0.png,t,red\n",
        ["manifest.csv", "row 2", "'image'", "NUL"],
    ),
    "nul-in-jsonl-path": (
        "manifest.jsonl",
        jsonl_with(json.dumps({**ROW, "id": "b", "image": "images/b\0.png"})),
        ["manifest.jsonl", "row 2", "'image'", "NUL"],
    ),
    "huge-int-jsonl-label": (
        "manifest.jsonl",
        jsonl_with(f'{{"id": "b", "image": "images/a.png", "text": "t", "label": {HUGE}}}'),
        ["manifest.jsonl", "line 2", "'label'", "5000-digit"],
    ),
    "huge-int-jsonl-id": (
        "manifest.jsonl",
        jsonl_with(f'{{"id": -{HUGE}, "image": "images/a.png", "text": "t", "label": "red"}}'),
        ["manifest.jsonl", "line 2", "'id'", "5000-digit"],
    ),
    "huge-int-nested-in-jsonl": (
        "manifest.jsonl",
        jsonl_with(f'{{"id": "b", "image": null, "text": "t", "label": [[{HUGE}]]}}'),
        ["manifest.jsonl", "line 2", "'label'", "5000-digit"],
    ),
    "lone-surrogate-jsonl": (
        "manifest.jsonl",
        jsonl_with(json.dumps({**ROW, "id": "b\ud800"})),
        ["manifest.jsonl", "row 2", "'id'", "surrogate"],
    ),
    "deep-nesting-jsonl": (
        "manifest.jsonl",
        jsonl_with('{"id": "b", "label": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        ["manifest.jsonl", "line 2", "invalid JSON"],
    ),
}


def write_case(tmp_path: Path, case: str) -> Path:
    name, content, _ = CASES[case]
    root = tmp_path / "data"
    root.mkdir()
    (root / name).write_text(content, encoding="utf-8", errors="surrogatepass")
    return root


@pytest.mark.parametrize("case", CASES)
def test_reading_the_manifest_names_file_and_field(tmp_path: Path, case: str) -> None:
    root = write_case(tmp_path, case)
    with pytest.raises(DatasetError) as info:
        read_manifest(root)
    assert all(name in str(info.value) for name in CASES[case][2]), info.value


@pytest.mark.parametrize("case", CASES)
def test_validation_reports_a_failed_manifest_check(
    tmp_path: Path, small_params: Params, case: str
) -> None:
    report = validate_dataset(write_case(tmp_path, case), small_params)
    assert not report.success
    [check] = report.failed
    assert check.name == "manifest"
    assert all(name in check.detail for name in CASES[case][2]), check.detail
    json.dumps(report.to_dict())  # the report is writable as JSON


@pytest.mark.parametrize("case", ["empty-csv", "header-only-csv", "nul-in-csv-path"])
def test_mmops_validate_exits_1_with_the_failed_check(tmp_path: Path, case: str) -> None:
    root = write_case(tmp_path, case)
    result = runner.invoke(app, ["validate", str(root)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "FAIL manifest:" in result.stdout
    assert all(name in result.stdout for name in CASES[case][2]), result.stdout


@pytest.mark.parametrize("case", ["empty-jsonl", "nul-in-jsonl-path", "huge-int-jsonl-id"])
def test_training_on_the_manifest_is_a_user_error(tmp_path: Path, case: str) -> None:
    root = write_case(tmp_path, case)
    args = ["train", "--data", str(root), "--out", str(tmp_path / "out"), "--allow-unvalidated"]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert all(name in error for name in CASES[case][2]), error
    assert "hint:" in result.stderr


def test_a_binary_jsonl_manifest_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "manifest.jsonl").write_bytes(b'{"id": "\xff\xfe"}\n')
    with pytest.raises(DatasetError, match="not UTF-8"):
        read_manifest(tmp_path)


def test_a_huge_number_in_csv_is_a_string_and_validates(
    demo_dir: Path, tmp_path: Path, small_params: Params
) -> None:
    # CSV cells are text: a 5000-digit id or label is a (strange) string, not a crash.
    root = tmp_path / "data"
    shutil.copytree(demo_dir, root)
    frame = read_manifest(root)
    frame.loc[0, "id"] = HUGE
    frame.loc[1, "label"] = HUGE
    (root / "manifest.jsonl").unlink()
    frame.to_csv(root / "manifest.csv", index=False)

    report = validate_dataset(root, small_params)

    assert read_manifest(root).loc[0, "id"] == HUGE
    assert "classes.min_examples" in {c.name for c in report.failed}
    json.dumps(report.to_dict())


def test_a_long_value_is_shortened_in_the_one_line_summary() -> None:
    detail = f"'{HUGE}' has 1"
    check = CheckResult("classes.min_examples", False, detail, ids=(HUGE,), files=("x.png",))
    summary = check.summary()
    assert len(summary) < 1300
    assert f"({len(detail)} characters)" in summary and "(5000 characters)" in summary
    assert "x.png" in summary


def test_inspecting_a_path_with_a_nul_byte_is_a_failed_check(tmp_path: Path) -> None:
    info = inspect_image(str(tmp_path), "images/a\0.png", Params().validate.image)
    assert info.problem == "image.exists" and "NUL" in info.message
