"""`mmops train` and `mmops evaluate` against a real MLflow tracking store (SQLite in tmp)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
from typer.testing import CliRunner

from mmops.cli import app
from mmops.config import load_params, to_dict
from mmops.data.dataset import read_manifest
from mmops.data.versioning import data_version
from mmops.serving.predictor import Predictor
from mmops.tracking.runs import flatten

pytestmark = pytest.mark.integration

runner = CliRunner()


@dataclass(frozen=True)
class Tracked:
    workdir: Path
    data_dir: Path
    commit: str
    train: dict[str, Any]
    evaluate: dict[str, Any]
    export: dict[str, Any]
    client: mlflow.MlflowClient


def set_args(overrides: tuple[str, ...]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def invoke(*args: str) -> dict[str, Any]:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def git(cwd: Path, *args: str) -> str:
    command = ["git", "-c", "user.email=ci@mmops.dev", "-c", "user.name=ci", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def tracked(
    demo_dir: Path, tiny_overrides: tuple[str, ...], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tracked]:
    """One `train` and one `evaluate` through the CLI, tracked in a fresh SQLite store."""
    workdir = tmp_path_factory.mktemp("tracking")
    # The data in its own git repo, so the run can record a real commit for it.
    repo = workdir / "repo"
    shutil.copytree(demo_dir, repo / "data")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "data")
    commit = git(repo, "rev-parse", "HEAD").strip()
    data_dir = repo / "data"
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)  # default output folders and the artifact store land in tmp
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        # As `dvc repro train` does: validate into reports/validate, where train looks.
        validate = ["validate", str(data_dir), "--out", "reports/validate", "--json"]
        invoke(*validate, *set_args(tiny_overrides))
        trained = invoke("train", "--data", str(data_dir), *set_args(tiny_overrides), "--json")
        evaluated = invoke(
            "evaluate",
            "--data",
            str(data_dir),
            "--model",
            trained["model_dir"],
            *set_args(tiny_overrides),
            "--json",
        )
        exported = invoke(
            "export",
            "--data",
            str(data_dir),
            "--model",
            trained["model_uri"],
            "--out",
            str(workdir / "export"),
            *set_args(tiny_overrides),
            "--json",
        )
        yield Tracked(
            workdir,
            data_dir,
            commit,
            trained,
            evaluated,
            exported,
            mlflow.MlflowClient(tracking_uri=uri),
        )
    mlflow.set_tracking_uri(previous_uri)


def test_train_run_records_params_tags_and_epoch_metrics(
    tracked: Tracked, tiny_overrides: tuple[str, ...]
) -> None:
    run = tracked.client.get_run(tracked.train["run_id"])
    params = load_params(None, tiny_overrides)

    assert set(flatten(to_dict(params))) <= set(run.data.params)
    assert run.data.params["model.fusion"] == params.model.fusion
    assert float(run.data.params["train.lr"]) == params.train.lr
    history = tracked.client.get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == list(range(1, params.train.epochs + 1))
    assert run.data.metrics["best_val_accuracy"] == tracked.train["best_val_accuracy"]
    tags = run.data.tags
    assert tags["data.md5"] == data_version(tracked.data_dir).md5
    assert tags["data.md5"].endswith(".dir")
    assert tags["git.commit"] == tracked.commit
    assert tags["mmops.stage"] == "train"


def test_train_run_records_the_validation_that_admitted_its_data(tracked: Tracked) -> None:
    tags = tracked.client.get_run(tracked.train["run_id"]).data.tags

    assert tracked.train["validation"] == "passed"
    assert tags["mmops.validation"] == "passed"
    assert tags["mmops.validation.data_md5"] == tags["data.md5"]
    report = tracked.workdir / "reports/validate/validation.json"
    assert tags["mmops.validation.report"] == str(report.resolve())
    assert "mmops.validation.reason" not in tags


def test_training_refuses_unvalidated_data_and_leaves_no_run(
    tracked: Tracked, tiny_overrides: tuple[str, ...], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tracked.data_dir, data)
    (data / "notes.txt").write_text("a file added after validation\n")
    experiment = tracked.client.get_experiment_by_name(load_params(None).tracking.experiment)
    runs_before = tracked.client.search_runs([experiment.experiment_id])
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tracked.workdir)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracked.workdir / 'mlflow.db'}")
        args = ["train", "--data", str(data), "--out", str(tmp_path / "out")]
        refused = runner.invoke(app, [*args, *set_args(tiny_overrides)])

    assert refused.exit_code == 2
    error = refused.stderr.splitlines()[0]
    assert error.startswith("error: reports/validate/validation.json validated ")
    assert data_version(data).md5 in error
    assert not (tmp_path / "out").exists()
    runs_after = tracked.client.search_runs([experiment.experiment_id])
    assert len(runs_after) == len(runs_before)


def test_the_override_trains_and_tags_the_run_skipped(
    tracked: Tracked, tiny_overrides: tuple[str, ...], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tracked.data_dir, data)
    (data / "notes.txt").write_text("a file added after validation\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tracked.workdir)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracked.workdir / 'mlflow.db'}")
        args = ["train", "--data", str(data), "--out", str(tmp_path / "out")]
        summary = invoke(
            *args, "--allow-unvalidated", *set_args((*tiny_overrides, "train.epochs=1")), "--json"
        )

    tags = tracked.client.get_run(summary["run_id"]).data.tags
    assert summary["validation"] == tags["mmops.validation"] == "skipped"
    assert data_version(data).md5 in tags["mmops.validation.reason"]
    assert summary["validation_reason"] == tags["mmops.validation.reason"]


def test_train_run_records_the_dataset(tracked: Tracked) -> None:
    run = tracked.client.get_run(tracked.train["run_id"])
    md5 = data_version(tracked.data_dir).md5

    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    assert inputs[0].dataset.digest == md5[:32]
    assert inputs[0].dataset.name == tracked.data_dir.name
    assert [tag.value for tag in inputs[0].tags if tag.key == "mlflow.data.context"] == ["training"]


def encode(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_logged_model_predicts_like_evaluate(tracked: Tracked) -> None:
    model = mlflow.pyfunc.load_model(tracked.train["model_uri"])
    rows = read_manifest(tracked.data_dir).head(3)
    frame = pd.DataFrame(
        {
            "id": rows["id"].astype(str),
            "text": rows["text"],
            "image": [encode(tracked.data_dir / p) for p in rows["image"]],
        }
    )
    # A missing image and a missing text are inputs, not errors.
    frame.loc[len(frame)] = ["no-image", rows["text"].iloc[0], None]
    frame.loc[len(frame)] = ["no-text", None, encode(tracked.data_dir / rows["image"].iloc[0])]

    out = model.predict(frame)

    labels = json.loads((Path(tracked.train["model_dir"]) / "mmops_model.json").read_text())[
        "labels"
    ]
    assert len(out) == len(frame)
    assert set(out["label"]) <= set(labels)
    assert list(out.columns) == ["id", "label", *(f"score_{label}" for label in labels), "error"]
    assert (out["error"] == "").all()


def test_logged_model_shares_the_evaluation_prediction_path(tracked: Tracked) -> None:
    lines = (tracked.workdir / "reports/evaluate/predictions.jsonl").read_text().splitlines()
    predictions = [json.loads(line) for line in lines[:3]]
    manifest = read_manifest(tracked.data_dir).set_index("id")
    rows = manifest.loc[[p["id"] for p in predictions]]
    frame = pd.DataFrame(
        {
            "id": rows.index.astype(str),
            "text": rows["text"].to_list(),
            "image": [encode(tracked.data_dir / p) for p in rows["image"]],
        }
    )

    out = mlflow.pyfunc.load_model(tracked.train["model_uri"]).predict(frame)

    for (_, served), evaluated in zip(out.iterrows(), predictions, strict=True):
        assert served["label"] == evaluated["label"]
        for label, score in evaluated["scores"].items():
            assert served[f"score_{label}"] == pytest.approx(score, abs=1e-5)


def test_evaluation_is_logged_to_the_training_run(tracked: Tracked) -> None:
    run_id = tracked.train["run_id"]
    run = tracked.client.get_run(run_id)

    assert tracked.evaluate["run_id"] == run_id
    assert run.data.metrics["test.accuracy"] == tracked.evaluate["accuracy"]
    assert "test.robustness.image_noise.drop" in run.data.metrics
    assert run.data.tags["mmops.evaluated"] == "true"
    artifacts = {a.path for a in tracked.client.list_artifacts(run_id, "evaluation")}
    for name in ("report.md", "confusion_matrix.png", "reliability.png", "metrics.json"):
        assert f"evaluation/{name}" in artifacts


@pytest.mark.parametrize("kind", ["runs", "models"])
def test_evaluate_resolves_mlflow_model_uris(
    tracked: Tracked, tiny_overrides: tuple[str, ...], kind: str
) -> None:
    run_id = tracked.train["run_id"]
    uri = f"runs:/{run_id}/model" if kind == "runs" else tracked.train["model_uri"]
    out = tracked.workdir / f"reports/{kind}"

    evaluated = invoke(
        "evaluate",
        "--data",
        str(tracked.data_dir),
        "--model",
        uri,
        "--out",
        str(out),
        *set_args(tiny_overrides),
        "--json",
    )

    assert evaluated["run_id"] == run_id
    assert evaluated["accuracy"] == tracked.evaluate["accuracy"]
    assert (out / "report.md").is_file()


def test_export_is_logged_to_the_training_run_with_a_serving_model(tracked: Tracked) -> None:
    run_id = tracked.train["run_id"]
    run = tracked.client.get_run(run_id)
    exported = tracked.export

    assert exported["run_id"] == run_id
    assert run.data.tags["export.serving"] == exported["serving"]
    assert run.data.tags["export.int8_passed"] == str(exported["int8_passed"])
    assert run.data.metrics["export.size_ratio_int8_vs_fp32"] < 1
    assert "export.latency.int8.bs32.p50_ms" in run.data.metrics
    artifacts = {a.path for a in tracked.client.list_artifacts(run_id, "export")}
    assert {"export/model.onnx", "export/model.int8.onnx", "export/export.json"} <= artifacts

    # The serving model carries its ONNX files, and serves what the gate chose.
    served = mlflow.pyfunc.load_model(exported["model_uri"])
    rows = read_manifest(tracked.data_dir).head(4)
    frame = pd.DataFrame(
        {
            "id": rows["id"].astype(str),
            "text": rows["text"],
            "image": [encode(tracked.data_dir / p) for p in rows["image"]],
        }
    )
    out = served.predict(frame)
    local = Predictor(tracked.workdir / "export").predict_batch(
        rows[["id", "image", "text"]].to_dict("records"), root=tracked.data_dir
    )
    assert list(out["label"]) == [r["label"] for r in local]


def test_predictor_names_the_registered_version(tracked: Tracked) -> None:
    name = "mmops-predict-test"
    version = mlflow.register_model(tracked.export["model_uri"], name).version
    tracked.client.set_registered_model_alias(name, "champion", version)
    record = read_manifest(tracked.data_dir).iloc[0]

    predictor = Predictor.load(f"models:/{name}@champion")
    [result] = predictor.predict_batch(
        [
            {
                "id": record["id"],
                "image": (tracked.data_dir / record["image"]).read_bytes(),
                "text": record["text"],
            }
        ]
    )

    assert (result["model"], result["version"]) == (name, str(version))
    assert predictor.backend == tracked.export["serving"]
    assert predictor.identity.run_id == tracked.train["run_id"]


def test_training_core_imports_without_tracking_tools() -> None:
    code = (
        "import sys\n"
        "for name in ('mlflow', 'prefect', 'dvc'):\n"
        "    sys.modules[name] = None\n"
        "import mmops.training.train, mmops.model.storage, mmops.evaluation.evaluate\n"
    )

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    assert done.returncode == 0, done.stderr
