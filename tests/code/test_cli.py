from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mmops.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_params_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in an empty directory so the repo's params.yaml does not leak into the tests."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)


def set_args(overrides: tuple[str, ...]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def last_json(output: str) -> dict:
    """The JSON a `--json` command printed: stdout holds it alone, so `| jq` works."""
    return json.loads(output)


def test_validate_clean_dataset_exits_zero(
    demo_dir: Path, small_overrides: tuple[str, ...]
) -> None:
    result = runner.invoke(app, ["validate", str(demo_dir), *set_args(small_overrides), "--json"])
    assert result.exit_code == 0, result.output
    assert "FAIL" not in result.stdout + result.stderr
    assert "400 rows" in result.stderr  # messages for a person go to stderr with --json
    report = last_json(result.stdout)
    assert report["success"] is True
    assert report["failed_checks"] == []


def test_validate_writes_report_and_metrics(
    demo_dir: Path, small_overrides: tuple[str, ...], tmp_path: Path
) -> None:
    out, metrics = tmp_path / "report", tmp_path / "metrics" / "validate.json"
    result = runner.invoke(
        app,
        [
            "validate",
            str(demo_dir),
            *set_args(small_overrides),
            "--out",
            str(out),
            "--metrics",
            str(metrics),
        ],
    )
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"validation.json", "gx_result.json", "report.html"}
    assert json.loads(metrics.read_text())["rows"] == 400


def test_validate_broken_dataset_exits_one_and_names_offenders(
    demo_dir: Path, small_overrides: tuple[str, ...], tmp_path: Path
) -> None:
    root = tmp_path / "data"
    shutil.copytree(demo_dir, root)
    lines = (root / "manifest.jsonl").read_text().splitlines()
    row = json.loads(lines[3])
    row["text"] = "   "
    lines[3] = json.dumps(row)
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")

    result = runner.invoke(app, ["validate", str(root), *set_args(small_overrides), "--json"])
    assert result.exit_code == 1, result.output
    fails = [line for line in result.stderr.splitlines() if line.startswith("FAIL ")]
    assert len(fails) == 1
    assert fails[0].startswith("FAIL text.not_blank:")
    assert row["id"] in fails[0]
    assert "NOT fit to train on (1 checks failed)" in result.stderr
    report = last_json(result.stdout)
    assert report["success"] is False
    assert report["failed_checks"] == ["text.not_blank"]


def test_validate_missing_dataset_exits_one(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(tmp_path / "nowhere")])
    assert result.exit_code == 1
    assert "FAIL manifest" in result.stdout


def test_unknown_set_key_exits_two_and_names_it(demo_dir: Path) -> None:
    result = runner.invoke(app, ["validate", str(demo_dir), "--set", "validate.wrokers=1"])
    assert result.exit_code == 2
    assert "validate.wrokers" in result.stderr
    assert "did you mean 'workers'" in result.stderr


def test_bad_params_file_exits_two(demo_dir: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("demo_data: {n: lots}\n")
    result = runner.invoke(app, ["validate", str(demo_dir), "--params", str(params)])
    assert result.exit_code == 2
    assert "demo_data.n" in result.stderr


def test_params_yaml_in_working_directory_is_used(
    demo_dir: Path, small_overrides: tuple[str, ...]
) -> None:
    Path("params.yaml").write_text("validate: {min_split_size: {test: 1000}}\n")
    others = tuple(o for o in small_overrides if not o.startswith("validate.min_split_size.test"))
    result = runner.invoke(app, ["validate", str(demo_dir), *set_args(others)])
    assert result.exit_code == 1
    assert "FAIL splits.min_size: test has" in result.stdout
    # --set wins over the file.
    result = runner.invoke(app, ["validate", str(demo_dir), *set_args(small_overrides)])
    assert result.exit_code == 0, result.output


def test_demo_data_writes_n_rows(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo-data", str(out), "--n", "50", "--seed", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 50
    assert len(list(out.rglob("*.png"))) == 50
    summary = last_json(result.stdout)
    assert (summary["n"], summary["seed"]) == (50, 2)
    assert summary["manifest"] == str(out / "manifest.jsonl")


def test_demo_data_takes_defaults_from_params(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = runner.invoke(
        app, ["demo-data", str(out), "--set", "demo_data.n=7", "--set", "demo_data.image_size=32"]
    )
    assert result.exit_code == 0, result.output
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 7
    with Image.open(next(out.rglob("*.png"))) as image:
        assert image.size == (32, 32)


def test_demo_data_refuses_a_foreign_directory(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["demo-data", str(out), "--n", "5"])
    assert result.exit_code == 2
    assert "refusing to overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_data_version_is_stable_and_tracks_content(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert runner.invoke(app, ["demo-data", str(out), "--n", "20"]).exit_code == 0

    first = runner.invoke(app, ["data-version", str(out), "--json"])
    second = runner.invoke(app, ["data-version", str(out), "--json"])
    assert first.exit_code == second.exit_code == 0, first.output
    v1, v2 = last_json(first.stdout), last_json(second.stdout)
    assert v1["md5"].endswith(".dir")
    assert len(v1["md5"]) == len("0" * 32 + ".dir")
    assert v1["md5"] == v2["md5"]
    assert v1["nfiles"] == 22
    assert v1["tracked"] is False
    assert v1["md5"] in first.stdout.splitlines()[0]

    image = next(out.rglob("*.png"))
    Image.new("RGB", (64, 64), (1, 2, 3)).save(image)
    changed = last_json(runner.invoke(app, ["data-version", str(out), "--json"]).stdout)
    assert changed["md5"].endswith(".dir")
    assert changed["md5"] != v1["md5"]


def test_version_prints_the_package_version() -> None:
    from mmops import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"mmops {__version__}"


def test_without_json_messages_go_to_stdout(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo-data", str(tmp_path / "demo"), "--n", "20"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("wrote 20 examples")
    assert not result.stderr
