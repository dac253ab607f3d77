"""The newcomer's view of the CLI: complete help, and one `error:` + `hint:` line per mistake."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mmops.cli import app

MMOPS = str(Path(sys.executable).parent / "mmops")
runner = CliRunner()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An empty MLflow store, shared: creating its tables takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def model_dir(untrained_model_dir: Path) -> Path:
    return untrained_model_dir


@pytest.fixture(autouse=True)
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: str) -> Path:
    """An empty working directory with the mistakes' files, and the empty registry."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    monkeypatch.delenv("MMOPS_DEBUG", raising=False)
    (tmp_path / "no-manifest").mkdir()
    (tmp_path / "a-file").write_text("x\n")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00binary")
    (tmp_path / "broken.json").write_text('{"sent": 1')
    return tmp_path


def assert_user_error(code: int, stderr: str, *names: str) -> None:
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert code != 0, stderr
    assert len(errors) == 1, stderr
    assert all(name in errors[0] for name in names), stderr
    assert any(line.startswith("hint:") for line in lines), stderr
    assert "Traceback" not in stderr


def test_every_command_option_and_argument_has_help() -> None:
    root = typer.main.get_command(app)
    missing = [f"mmops {p.name}" for p in root.params if not getattr(p, "help", None)]
    for name, command in root.commands.items():
        if not (command.help or "").strip():
            missing.append(f"mmops {name}")
        missing += [
            f"mmops {name} {p.name}" for p in command.params if not getattr(p, "help", None)
        ]
    assert not missing

    listing = runner.invoke(app, ["--help"], terminal_width=200)
    assert listing.exit_code == 0, listing.output
    for name, command in root.commands.items():
        assert name in listing.stdout
        assert command.get_short_help_str(limit=200).strip()


# Subprocesses: what a user sees, entry point and all.
@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["data-version", "nowhere"], ["nowhere"]),
        (["demo-data", "out", "--set", "demo_data.nn=3"], ["demo_data.nn"]),
        (
            [
                "predict",
                "--model",
                "models:/mmops-classifier@nope",
                "--input",
                "x.jsonl",
                "--out",
                "o",
            ],
            ["models:/mmops-classifier@nope"],
        ),
        (["topics", "--wait", "1"], ["127.0.0.1:1"]),
    ],
    ids=["missing-data-dir", "bad-set-key", "no-such-alias", "no-broker"],
)
def test_mistake_in_a_real_process(workdir: Path, args: list[str], names: list[str]) -> None:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    result = subprocess.run(
        [MMOPS, *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=120
    )
    assert_user_error(result.returncode, result.stderr, *names)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["validate", "x", "--set", "demo_data.n=lots"], ["demo_data.n", "lots"]),
        (["validate", "x", "--set", "demo_data.n"], ["demo_data.n", "key=value"]),
        (["models", "--params", "missing.yaml"], ["missing.yaml"]),
        (["train", "--data", "nowhere"], ["nowhere"]),
        (["evaluate", "--data", "a-file", "--model", "{model}"], ["a-file"]),
        (["evaluate", "--data", "no-manifest", "--model", "{model}"], ["no-manifest", "manifest"]),
        (
            ["predict", "--model", "no-such-folder", "--input", "x", "--out", "o"],
            ["no-such-folder"],
        ),
        (
            ["predict", "--model", "models:/nope/1", "--input", "x", "--out", "o"],
            ["models:/nope/1"],
        ),
        (["predict", "--model", "runs:/bad/model", "--input", "x", "--out", "o"], ["runs:/bad"]),
        (["predict", "--model", "{model}", "--input", "missing.jsonl", "--out", "o"], ["missing"]),
        (["predict", "--model", "{model}", "--input", "binary.jsonl", "--out", "o"], ["binary"]),
        (
            ["predict", "--model", "{model}", "--input", "no-manifest", "--out", "o"],
            ["no-manifest"],
        ),
        (["predict", "--model", "{model}", "--out", "o"], ["--input", "--data"]),
        (["predict", "--model", "{model}", "--data", "a-file", "--out", "o"], ["a-file"]),
        (["promote", "3", "--reason", "test"], ["mmops-classifier", "3"]),
        (["rollback"], ["mmops-classifier", "champion"]),
        (["summary"], ["mmops-classifier", "champion"]),
        (["summary", "--stream-report", "missing.json"], ["missing.json"]),
        (["summary", "--stream-report", "broken.json"], ["broken.json", "JSON"]),
        (["stream-demo", "--data", "nowhere"], ["nowhere"]),
        (["stream-demo", "--data", "{demo}", "--limit", "2"], ["127.0.0.1:1"]),
        (["serve"], ["KAFKA_SECURITY_PROTOCOL"]),
    ],
    ids=lambda value: " ".join(value),
)
def test_mistake_prints_error_and_hint(
    args: list[str],
    names: list[str],
    model_dir: Path,
    demo_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mmops.stream.settings

    settings = mmops.stream.settings.kafka_settings
    # The default minute of bootstrap retries would only make the no-broker case slow.
    monkeypatch.setattr(
        mmops.stream.settings, "kafka_settings", lambda: {**settings(), "bootstrap_timeout_ms": 500}
    )
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    if args == ["serve"]:
        monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "bogus")
    args = [a.format(model=model_dir, demo=demo_dir) for a in args]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, SystemExit), result.exception
    assert_user_error(result.exit_code, result.stderr, *names)


def test_verbose_and_mmops_debug_keep_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    result = runner.invoke(app, ["-v", "data-version", "nowhere"])
    assert isinstance(result.exception, FileNotFoundError)
    monkeypatch.setenv("MMOPS_DEBUG", "1")
    result = runner.invoke(app, ["data-version", "nowhere"])
    assert isinstance(result.exception, FileNotFoundError)


def test_a_bug_is_not_dressed_up_as_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import mmops.data.versioning

    def broken(_: object) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(mmops.data.versioning, "data_version", broken)
    result = runner.invoke(app, ["data-version", "."])
    assert isinstance(result.exception, KeyError)
