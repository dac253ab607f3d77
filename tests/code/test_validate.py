from __future__ import annotations

import json
import shutil
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import pytest
from PIL import Image

import mmops.data.validate
from mmops.config import ImageLimits, Params, load_params
from mmops.data.checks import CHECKS, CheckResult
from mmops.data.dataset import hash_split
from mmops.data.images import inspect_image
from mmops.data.validate import ValidationReport, validate_dataset
from mmops.data.validation_report import write_report

# Row 3 of the fixture: hash-split into train (asserted where it matters).
ROW = 3
ROW_ID = "demo-000003"
ROW_IMAGE = "images/000/demo-000003.png"
# The manifest has no `split` column, so the checks on it are not run; labels is null.
CLEAN_CHECKS = set(CHECKS) - {"label.in_set", "split.in_set", "types.split"}
# Manifest records; a string is written verbatim as a (broken) line.
Rows = list[Any]


def read_rows(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


def write_rows(root: Path, rows: Rows) -> None:
    lines = (r if isinstance(r, str) else json.dumps(r) for r in rows)
    (root / "manifest.jsonl").write_text("".join(line + "\n" for line in lines))


def copy_dataset(src: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(src, root, symlinks=True)
    return root


def failed_names(report: ValidationReport) -> set[str]:
    return {c.name for c in report.failed}


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG that claims `width` x `height` RGB pixels but holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def clean_report(demo_dir: Path, small_params: Params) -> ValidationReport:
    return validate_dataset(demo_dir, small_params)


def test_clean_dataset_passes(clean_report: ValidationReport) -> None:
    assert clean_report.success, [(c.name, c.summary()) for c in clean_report.failed]
    assert all(c.success for c in clean_report.checks)
    assert clean_report.failed == []
    assert {c.name for c in clean_report.checks} == CLEAN_CHECKS
    assert len(clean_report.checks) == len(CLEAN_CHECKS)


def test_checks_come_in_catalogue_order(clean_report: ValidationReport) -> None:
    names = [c.name for c in clean_report.checks]
    assert names == [n for n in CHECKS if n in names]


def test_clean_stats(clean_report: ValidationReport, demo_dir: Path) -> None:
    rows = read_rows(demo_dir)
    stats = clean_report.stats
    assert stats["rows"] == 400
    assert stats["class_counts"] == dict(Counter(r["label"] for r in rows))
    assert stats["classes"] == len(stats["class_counts"])
    assert sum(stats["split_sizes"].values()) == 400
    assert stats["missing_image_rate"] == stats["missing_text_rate"] == 0.0
    assert sum(stats["groups"].values()) == 400


def test_split_and_label_checks_run_when_they_apply(
    demo_dir: Path, small_overrides: tuple[str, ...], tmp_path: Path
) -> None:
    root = copy_dataset(demo_dir, tmp_path)
    rows = read_rows(root)
    rows[ROW]["split"] = "train"
    write_rows(root, rows)
    labels = sorted({r["label"] for r in rows})
    params = load_params(None, [*small_overrides, f"validate.labels=[{', '.join(labels)}]"])
    report = validate_dataset(root, params)
    assert report.success, [(c.name, c.summary()) for c in report.failed]
    assert {c.name for c in report.checks} == set(CHECKS)


class Case(NamedTuple):
    name: str
    breaker: Callable[[Path, Rows], list[str]]
    failed: set[str]
    # Where the offender must be named in each failed check: "ids", "files" or "detail".
    where: str
    offender: str


def set_value(column: str, value: object) -> Callable[[Path, Rows], list[str]]:
    def breaker(root: Path, rows: Rows) -> list[str]:
        rows[ROW][column] = value
        return []

    return breaker


def drop_text_column(root: Path, rows: Rows) -> list[str]:
    for row in rows:
        del row["text"]
    return []


def duplicate_id(root: Path, rows: Rows) -> list[str]:
    rows[ROW]["id"] = rows[ROW + 1]["id"]
    return []


def labels_missing_one_class(root: Path, rows: Rows) -> list[str]:
    labels = sorted({r["label"] for r in rows} - {rows[ROW]["label"]})
    return [f"validate.labels=[{', '.join(labels)}]"]


def rare_class(root: Path, rows: Rows) -> list[str]:
    # Keep 4 of the row's class (the threshold is 5); dropping rows rather than relabelling
    # them keeps the largest / smallest ratio under max_class_imbalance.
    label = rows[ROW]["label"]
    keep = {id(r) for r in [r for r in rows if r["label"] == label][:4]}
    rows[:] = [r for r in rows if r["label"] != label or id(r) in keep]
    return []


def small_test_split(root: Path, rows: Rows) -> list[str]:
    return ["validate.min_split_size.test=1000"]


def class_only_in_test(root: Path, rows: Rows) -> list[str]:
    # Existing images with new texts: no (image, text) pair is shared, so nothing leaks.
    for k in range(6):
        rows.append(
            {
                "id": f"purple-{k}",
                "image": rows[k]["image"],
                "text": f"Is it purple? ({k})",
                "label": "purple",
                "group": "studio",
                "split": "test",
            }
        )
    return []


def imbalance(root: Path, rows: Rows) -> list[str]:
    return ["validate.max_class_imbalance=1.5"]


def leak_to_test(root: Path, rows: Rows) -> list[str]:
    row = rows[ROW]
    assert hash_split(row["id"], load_params(None).data.split) == "train"
    # A copy under another name still leaks: the check compares content, not paths.
    shutil.copy(root / row["image"], root / "images" / "copy.png")
    rows.append({**row, "id": "leak-0", "image": "images/copy.png", "split": "test"})
    return []


def allow_missing_images(root: Path, rows: Rows) -> list[str]:
    rows[ROW]["image"] = None
    return ["data.max_missing_image_rate=0.05"]


def absolute_path(root: Path, rows: Rows) -> list[str]:
    rows[ROW]["image"] = str((root / rows[ROW]["image"]).resolve())
    return []


def symlink_outside(root: Path, rows: Rows) -> list[str]:
    outside = root.parent / "outside.png"
    shutil.copy(root / rows[ROW]["image"], outside)
    (root / "images" / "link.png").symlink_to(outside)
    rows[ROW]["image"] = "images/link.png"
    return []


def delete_image(root: Path, rows: Rows) -> list[str]:
    (root / ROW_IMAGE).unlink()
    return []


def txt_extension(root: Path, rows: Rows) -> list[str]:
    # The file is renamed too, so it exists and decodes: only the extension is wrong.
    (root / ROW_IMAGE).rename(root / "images" / "demo-000003.txt")
    rows[ROW]["image"] = "images/demo-000003.txt"
    return []


def text_file_as_png(root: Path, rows: Rows) -> list[str]:
    (root / ROW_IMAGE).write_text("this is not an image\n" * 10)
    return []


def gif_as_png(root: Path, rows: Rows) -> list[str]:
    path = root / ROW_IMAGE
    Image.open(path).convert("P").save(path, format="GIF")
    return []


def truncated_png(root: Path, rows: Rows) -> list[str]:
    path = root / ROW_IMAGE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return []


def tiny_png(root: Path, rows: Rows) -> list[str]:
    Image.new("RGB", (4, 4), (200, 30, 30)).save(root / ROW_IMAGE, format="PNG")
    return []


def header_only_png(width: int, height: int) -> Callable[[Path, Rows], list[str]]:
    def breaker(root: Path, rows: Rows) -> list[str]:
        (root / ROW_IMAGE).write_bytes(png_header_only(width, height))
        return []

    return breaker


def tiny_file_limit(root: Path, rows: Rows) -> list[str]:
    return ["validate.image.max_file_mb=0.001"]


def malformed_line(root: Path, rows: Rows) -> list[str]:
    rows.append('{"id": "demo-x", "image": ')
    return []


CASES = [
    Case("missing column", drop_text_column, {"columns.required"}, "detail", "'text'"),
    Case("label int", set_value("label", 5), {"types.label"}, "ids", ROW_ID),
    Case("duplicate id", duplicate_id, {"id.unique"}, "ids", "demo-000004"),
    Case("empty id", set_value("id", ""), {"id.non_empty"}, "ids", ""),
    # GX leaves nulls out of type, length and uniqueness checks, so only not_null fails; the
    # row has no id to name, so the detail counts it.
    Case("null id", set_value("id", None), {"id.not_null"}, "detail", "1 of 400 rows"),
    # "" is both blank and shorter than text_min_chars.
    Case("empty text", set_value("text", ""), {"text.not_blank", "text.length"}, "ids", ROW_ID),
    Case("blank text", set_value("text", "   "), {"text.not_blank"}, "ids", ROW_ID),
    Case("long text", set_value("text", "x" * 2000), {"text.length"}, "ids", ROW_ID),
    Case("null label", set_value("label", None), {"label.not_null"}, "ids", ROW_ID),
    Case("unknown split", set_value("split", "dev"), {"split.in_set"}, "ids", ROW_ID),
    Case("label not in set", labels_missing_one_class, {"label.in_set"}, "ids", ROW_ID),
    Case("rare class", rare_class, {"classes.min_examples"}, "detail", "has 4 (need 5)"),
    Case("small split", small_test_split, {"splits.min_size"}, "detail", "(need 1000)"),
    Case("class not in train", class_only_in_test, {"classes.in_train"}, "detail", "purple"),
    Case("imbalance", imbalance, {"classes.balance"}, "detail", "> 1.5"),
    Case("leakage", leak_to_test, {"splits.leakage"}, "ids", "leak-0"),
    Case("null image", set_value("image", None), {"image.missing_rate"}, "ids", ROW_ID),
    Case("null image allowed", allow_missing_images, set(), "ids", ""),
    Case("null text", set_value("text", None), {"text.missing_rate"}, "ids", ROW_ID),
    Case("absolute path", absolute_path, {"image.path_relative"}, "ids", ROW_ID),
    Case(
        "parent path", set_value("image", "../outside.png"), {"image.path_relative"}, "ids", ROW_ID
    ),
    Case("symlink outside", symlink_outside, {"image.inside_dataset"}, "files", "images/link.png"),
    Case("missing file", delete_image, {"image.exists"}, "files", ROW_IMAGE),
    Case("txt extension", txt_extension, {"image.extension"}, "ids", ROW_ID),
    Case("text as png", text_file_as_png, {"image.decodes"}, "files", ROW_IMAGE),
    Case("gif as png", gif_as_png, {"image.format"}, "files", ROW_IMAGE),
    Case("truncated png", truncated_png, {"image.decodes"}, "files", ROW_IMAGE),
    Case("tiny image", tiny_png, {"image.dimensions"}, "files", ROW_IMAGE),
    # Over PIL's own bomb limit: Image.open refuses it.
    Case("bomb", header_only_png(100_000, 100_000), {"image.dimensions"}, "files", ROW_IMAGE),
    # Under PIL's limit but over validate.image.max_pixels: our header check must catch it,
    # or the tiny IDAT would be reported as a decode error instead.
    Case("too many pixels", header_only_png(5000, 4000), {"image.dimensions"}, "files", ROW_IMAGE),
    Case("too long a side", header_only_png(5000, 16), {"image.dimensions"}, "files", ROW_IMAGE),
    Case("file too large", tiny_file_limit, {"image.file_size"}, "files", ROW_IMAGE),
    Case("malformed line", malformed_line, {"manifest"}, "detail", "line 401"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_one_break_fails_exactly_its_checks(
    case: Case, demo_dir: Path, small_overrides: tuple[str, ...], tmp_path: Path
) -> None:
    root = copy_dataset(demo_dir, tmp_path)
    rows = read_rows(root)
    overrides = case.breaker(root, rows)
    write_rows(root, rows)
    report = validate_dataset(root, load_params(None, [*small_overrides, *overrides]))
    assert failed_names(report) == case.failed, [(c.name, c.summary()) for c in report.failed]
    for check in report.failed:
        named = check.detail if case.where == "detail" else getattr(check, case.where)
        assert case.offender in named, (check.name, check.summary())


def test_missing_column_skips_row_checks(
    demo_dir: Path, small_params: Params, tmp_path: Path
) -> None:
    root = copy_dataset(demo_dir, tmp_path)
    rows = read_rows(root)
    drop_text_column(root, rows)
    write_rows(root, rows)
    report = validate_dataset(root, small_params)
    assert not report.success
    assert "text.length" not in {c.name for c in report.checks}


def test_malformed_line_report_names_the_file(
    demo_dir: Path, small_params: Params, tmp_path: Path
) -> None:
    root = copy_dataset(demo_dir, tmp_path)
    rows = read_rows(root)
    malformed_line(root, rows)
    write_rows(root, rows)
    report = validate_dataset(root, small_params)
    (check,) = report.checks
    assert (check.name, check.success) == ("manifest", False)
    assert str(root / "manifest.jsonl") in check.detail
    assert report.manifest is None


def test_missing_dataset_dir_is_a_failed_manifest_check(tmp_path: Path) -> None:
    report = validate_dataset(tmp_path / "nowhere", Params())
    assert [c.name for c in report.failed] == ["manifest"]
    assert str(tmp_path / "nowhere") in report.failed[0].detail


def test_duplicate_rows_in_one_split_do_not_leak(
    demo_dir: Path, small_params: Params, tmp_path: Path
) -> None:
    root = copy_dataset(demo_dir, tmp_path)
    rows = read_rows(root)
    rows.append({**rows[ROW], "id": "copy-0", "split": "train"})
    write_rows(root, rows)
    assert validate_dataset(root, small_params).success


@pytest.mark.parametrize(
    ("column", "value", "failed"),
    [
        ("text", 5, {"types.text"}),
        ("image", 5, {"types.image", "image.extension"}),
        ("text", ["a"], {"types.text"}),
        ("text", {"a": 1}, {"types.text"}),
        ("image", ["images/a.png"], {"types.image"}),
    ],
    ids=["text-int", "image-int", "text-list", "text-dict", "image-list"],
)
def test_non_string_values_are_reported_not_raised(
    column: str,
    value: object,
    failed: set[str],
    demo_dir: Path,
    small_params: Params,
    tmp_path: Path,
) -> None:
    root = copy_dataset(demo_dir, tmp_path)
    rows = read_rows(root)
    rows[ROW][column] = value
    write_rows(root, rows)
    report = validate_dataset(root, small_params)
    assert failed <= failed_names(report)
    assert failed_names(report) <= failed | {"image.extension", "text.length", "text.not_blank"}
    assert all(ROW_ID in c.ids for c in report.failed)


def test_bomb_is_rejected_from_its_header_quickly(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    start = time.perf_counter()
    info = inspect_image(str(tmp_path), "bomb.png", ImageLimits())
    assert time.perf_counter() - start < 1.0
    assert info.problem == "image.dimensions"


def test_clean_image_info(demo_dir: Path) -> None:
    info = inspect_image(str(demo_dir), ROW_IMAGE, ImageLimits())
    assert info.problem is None
    assert (info.format, info.width, info.height) == ("PNG", 64, 64)
    assert len(info.sha256) == 64


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet_manifests_pass(
    fmt: str, demo_dir: Path, small_params: Params, tmp_path: Path
) -> None:
    root = copy_dataset(demo_dir, tmp_path)
    frame = pd.DataFrame(read_rows(root))
    (root / "manifest.jsonl").unlink()
    if fmt == "csv":
        frame.to_csv(root / "manifest.csv", index=False)
    else:
        frame.to_parquet(root / "manifest.parquet", index=False)
    report = validate_dataset(root, small_params)
    assert report.success, [(c.name, c.summary()) for c in report.failed]
    assert report.manifest == str(root / f"manifest.{fmt}")
    assert {c.name for c in report.checks} == CLEAN_CHECKS


def test_parallel_image_inspection_matches_serial(
    demo_dir: Path,
    small_overrides: tuple[str, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = copy_dataset(demo_dir, tmp_path)
    truncated_png(root, [])
    params = load_params(None, [*small_overrides, "validate.workers=2"])
    serial = validate_dataset(root, params)
    monkeypatch.setattr(mmops.data.validate, "_PARALLEL_FROM", 10)
    parallel = validate_dataset(root, params)
    assert failed_names(parallel) == {"image.decodes"}
    assert parallel.checks == serial.checks
    assert parallel.stats == serial.stats


def test_report_outputs(demo_dir: Path, small_params: Params, tmp_path: Path) -> None:
    root = copy_dataset(demo_dir, tmp_path)
    rows = read_rows(root)
    rows[ROW]["text"] = ""
    write_rows(root, rows)
    report = validate_dataset(root, small_params)

    plain = json.loads(json.dumps(report.to_dict()))
    assert plain["success"] is False
    assert plain["failed_checks"] == ["text.not_blank", "text.length"]
    assert {c["name"] for c in plain["checks"]} == CLEAN_CHECKS
    assert all(c["description"] == CHECKS[c["name"]] for c in plain["checks"])

    page = write_report(report, tmp_path / "out")
    assert page == tmp_path / "out" / "report.html"
    assert json.loads((tmp_path / "out" / "validation.json").read_text()) == plain
    gx = json.loads((tmp_path / "out" / "gx_result.json").read_text())
    assert gx["success"] is False
    html = page.read_text()
    assert "NOT fit to train on: 2 checks failed" in html
    for name in ("text.not_blank", "text.length"):
        assert f"<td>FAIL</td><td><code>{name}</code>" in html
    assert ROW_ID in html


def test_report_html_escapes(demo_dir: Path, small_params: Params, tmp_path: Path) -> None:
    root = copy_dataset(demo_dir, tmp_path)
    rows = read_rows(root)
    rows[ROW]["id"] = "<script>alert(1)</script>"
    rows[ROW + 1]["id"] = "<script>alert(1)</script>"
    write_rows(root, rows)
    html = write_report(validate_dataset(root, small_params), tmp_path / "out").read_text()
    assert "<script>" not in html
    assert "&lt;script&gt;" in html


def test_metrics(clean_report: ValidationReport) -> None:
    metrics = clean_report.metrics()
    sizes = clean_report.stats["split_sizes"]
    assert {k: metrics[f"split_sizes.{k}"] for k in ("train", "val", "test")} == sizes
    assert sizes["train"] > sizes["val"] > 0 and sizes["test"] > 0
    assert metrics["success"] is True
    assert metrics["checks_failed"] == 0
    assert metrics["checks_passed"] == len(CLEAN_CHECKS)
    assert metrics["rows"] == 400
    assert all(not isinstance(v, dict) for v in metrics.values())
    json.dumps(metrics)


def test_summary_lists_the_first_offenders() -> None:
    ids = tuple(f"id-{i}" for i in range(25))
    summary = CheckResult("id.unique", False, "dupes", ids=ids, files=("a.png",)).summary()
    assert summary.startswith("dupes; ids: id-0, id-1")
    assert "id-19 ... and 5 more" in summary
    assert "id-20" not in summary
    assert summary.endswith("files: a.png")
