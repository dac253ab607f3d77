"""Training takes only data that passed validation at its exact version, and its loader holds
every image to validation's path and size rules, whatever the report says."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mmops.cli import app
from mmops.config import Params, load_params
from mmops.data.dataset import DatasetError, load_splits
from mmops.data.validate import validate_dataset
from mmops.data.validation_report import REPORT_FILE, write_report
from mmops.data.versioning import data_version
from mmops.training.loaders import load_rows
from mmops.training.train import HISTORY_FILE, MODEL_DIR, train
from mmops.training.validation_gate import (
    VALIDATION_TAG,
    DataValidation,
    UnvalidatedDataError,
    require_validation,
)

runner = CliRunner()


def copy_of(demo_dir: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    return data


def write_validation(data: Path, params: Params, out: Path) -> Path:
    """What `mmops validate DATA --out OUT` leaves: the path of its validation.json."""
    write_report(validate_dataset(data, params), out)
    return out / REPORT_FILE


def set_image(data: Path, row_id: str, image: str) -> None:
    """Point one manifest row at another image path."""
    manifest = data / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:
        if row["id"] == row_id:
            row["image"] = image
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))


def first_train_row(data: Path, params: Params) -> str:
    frame = load_splits(data, params)
    return str(frame[frame["split"] == "train"]["id"].iloc[0])


def test_the_report_records_the_data_version_it_validated(
    demo_dir: Path, small_params: Params, tmp_path: Path
) -> None:
    report = validate_dataset(demo_dir, small_params)
    path = write_validation(demo_dir, small_params, tmp_path / "report")

    assert report.data_md5 == data_version(demo_dir).md5
    assert json.loads(path.read_text())["data_md5"] == report.data_md5


def test_training_without_a_report_refuses_before_touching_anything(
    demo_dir: Path, tiny_params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no reports/validate here
    out = tmp_path / "out"

    with pytest.raises(UnvalidatedDataError) as refused:
        train(demo_dir, tiny_params, out, progress=False)

    message = str(refused.value)
    assert message.startswith(f"no validation report at {tiny_params.train.validation_report}")
    assert f"mmops validate {demo_dir} --out reports/validate" in message
    assert "\n" not in message
    assert not out.exists()


def test_a_report_of_another_data_version_refuses_naming_both_versions(
    demo_dir: Path, small_params: Params, tmp_path: Path
) -> None:
    data = copy_of(demo_dir, tmp_path)
    report = write_validation(data, small_params, tmp_path / "report")
    validated = json.loads(report.read_text())["data_md5"]
    # One row's text changes after validation: another data version, never checked.
    manifest = data / "manifest.jsonl"
    manifest.write_text(manifest.read_text().replace('"text": "', '"text": "Now: ', 1))

    with pytest.raises(UnvalidatedDataError) as refused:
        require_validation(data, report)

    current = data_version(data).md5
    assert current != validated
    assert str(report) in str(refused.value)
    assert validated in str(refused.value) and current in str(refused.value)


def test_a_failed_report_refuses_naming_its_failed_checks(
    demo_dir: Path, small_overrides: tuple[str, ...], tmp_path: Path
) -> None:
    strict = load_params(None, [*small_overrides, "validate.min_examples_per_class=100000"])
    report = write_validation(demo_dir, strict, tmp_path / "report")

    with pytest.raises(UnvalidatedDataError, match=r"failed validation \(classes.min_examples\)"):
        require_validation(demo_dir, report)


def test_a_passing_report_of_this_version_admits_the_data(
    demo_dir: Path, demo_validation: DataValidation
) -> None:
    assert demo_validation.status == "passed" and not demo_validation.reason
    assert demo_validation.report_md5 == data_version(demo_dir).md5
    assert demo_validation.tags()[VALIDATION_TAG] == "passed"
    assert demo_validation.tags()[f"{VALIDATION_TAG}.data_md5"] == demo_validation.report_md5


def test_the_override_trains_and_records_the_skipped_validation(
    demo_dir: Path,
    tiny_overrides: tuple[str, ...],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    missing = tmp_path / "nowhere" / REPORT_FILE
    with caplog.at_level(logging.WARNING, logger="mmops"):
        skipped = require_validation(demo_dir, missing, allow_unvalidated=True)
    params = load_params(None, [*tiny_overrides, "train.epochs=1"])

    result = train(demo_dir, params, tmp_path / "out", progress=False, validation=skipped)

    assert skipped.status == "skipped"
    assert skipped.tags()[VALIDATION_TAG] == "skipped"
    assert str(missing) in skipped.tags()[f"{VALIDATION_TAG}.reason"]
    assert "did not pass validation" in caplog.text and str(missing) in caplog.text
    history = json.loads((tmp_path / "out" / HISTORY_FILE).read_text())
    assert history["validation"]["status"] == result.validation["status"] == "skipped"
    assert (tmp_path / "out" / MODEL_DIR).is_dir()


def test_mmops_train_without_a_report_exits_with_one_error_and_touches_nothing(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous-model").write_text("kept")

    result = runner.invoke(app, ["train", "--data", str(demo_dir), "--out", str(out)])

    assert result.exit_code == 2
    [error, hint] = result.stderr.strip().splitlines()
    assert error.startswith("error: no validation report at reports/validate/validation.json")
    assert "--allow-unvalidated" in hint
    assert (out / "previous-model").read_text() == "kept"
    assert not (tmp_path / "mlflow.db").exists()


def test_mmops_train_names_the_report_and_both_versions(
    demo_dir: Path, small_params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    other = copy_of(demo_dir, tmp_path)
    (other / "extra.txt").write_text("a file validation never saw\n")
    report = write_validation(demo_dir, small_params, tmp_path / "report")

    result = runner.invoke(app, ["train", "--data", str(other), "--validation-report", str(report)])

    assert result.exit_code == 2
    error = result.stderr.splitlines()[0]
    assert str(report) in error
    assert data_version(demo_dir).md5 in error and data_version(other).md5 in error
    assert not (tmp_path / "mlflow.db").exists()


def outside_image(tmp_path: Path) -> Path:
    path = tmp_path / "outside" / "secret.png"
    path.parent.mkdir()
    Image.new("RGB", (64, 64)).save(path)
    return path


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_the_training_loader_refuses_an_image_outside_the_dataset(
    how: str, demo_dir: Path, tiny_params: Params, tmp_path: Path
) -> None:
    data = copy_of(demo_dir, tmp_path)
    outside = outside_image(tmp_path)
    image = {"dotdot": "../outside/secret.png", "absolute": str(outside)}.get(how, "images/x.png")
    if how == "symlink":
        (data / "images" / "x.png").symlink_to(outside)
    row_id = first_train_row(data, tiny_params)
    set_image(data, row_id, image)
    skipped = require_validation(data, tmp_path / "none.json", allow_unvalidated=True)

    with pytest.raises(DatasetError, match="resolves outside the dataset") as refused:
        train(data, tiny_params, tmp_path / "out", progress=False, validation=skipped)

    assert repr(row_id) in str(refused.value) and repr(image) in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_the_training_loader_refuses_an_image_over_the_pixel_limit(
    demo_dir: Path, tiny_overrides: tuple[str, ...], tmp_path: Path
) -> None:
    data = copy_of(demo_dir, tmp_path)
    Image.new("RGB", (200, 200)).save(data / "images" / "big.png")
    # The demo's 64x64 images pass; 200x200 = 40000 pixels does not.
    params = load_params(None, [*tiny_overrides, "validate.image.max_pixels=10000"])
    row_id = first_train_row(data, params)
    set_image(data, row_id, "images/big.png")

    with pytest.raises(DatasetError) as refused:
        load_rows(data, params)

    message = str(refused.value)
    assert repr(row_id) in message and "images/big.png" in message
    assert "40000 pixels, over validate.image.max_pixels 10000" in message


def test_the_training_loader_refuses_a_missing_image(
    demo_dir: Path, tiny_params: Params, tmp_path: Path
) -> None:
    data = copy_of(demo_dir, tmp_path)
    row_id = first_train_row(data, tiny_params)
    set_image(data, row_id, "images/gone.png")

    with pytest.raises(DatasetError, match=rf"row {row_id!r}: image 'images/gone.png' not found"):
        load_rows(data, tiny_params)


def test_the_training_loader_refuses_an_image_in_another_format(
    demo_dir: Path, tiny_params: Params, tmp_path: Path
) -> None:
    data = copy_of(demo_dir, tmp_path)
    Image.new("RGB", (64, 64)).save(data / "images" / "drawing.png", format="GIF")
    row_id = first_train_row(data, tiny_params)
    set_image(data, row_id, "images/drawing.png")

    with pytest.raises(DatasetError, match="cannot be opened as PNG or JPEG") as refused:
        load_rows(data, tiny_params)

    assert repr(row_id) in str(refused.value) and "images/drawing.png" in str(refused.value)
