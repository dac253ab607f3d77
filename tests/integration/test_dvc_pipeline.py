"""`dvc repro`, `dvc push` and `dvc pull` on a temporary clone of the project: real DVC and git."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmops.data.demo import make_demo_data
from mmops.data.versioning import data_version

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    # The venv's bin first, so the `mmops` and `dvc` that stages call are this checkout's.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # The stages use the clone's own store (mlflow.db), whatever an earlier test left set.
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """The project's files as git sees them (tracked and not ignored), committed in a new repo."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    dest = tmp_path / "project"
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["demo_data"]["n"] = 300
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.email=ci@mmops.dev", "-c", "user.name=ci"]
    run(["git", "init", "-q", "-b", "main"], dest)
    run([*git, "add", "-A"], dest)
    run([*git, "commit", "-q", "-m", "clone"], dest)
    return dest


def locked_md5(project: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


def test_repro_push_pull_round_trip(clone: Path) -> None:
    run(["dvc", "repro", "validate"], clone)

    md5 = locked_md5(clone, "demo_data", "data/demo")
    version = data_version(clone / "data/demo")
    assert version.md5 == md5 and version.tracked
    assert version.git_commit and len(version.git_commit) == 40
    metrics = json.loads((clone / "metrics/validate.json").read_text())
    assert metrics["success"] is True and metrics["rows"] == 300
    assert (clone / "reports/validate/report.html").is_file()
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], clone).stdout)
    assert shown  # dvc reads the metrics file the stage declared

    # Nothing changed, so nothing reruns.
    again = run(["dvc", "repro", "validate"], clone)
    assert "didn't change" in again.stdout and "Running stage" not in again.stdout

    run(["dvc", "push", "demo_data"], clone)
    shutil.rmtree(clone / "data/demo")
    shutil.rmtree(clone / ".dvc/cache")
    run(["dvc", "pull", "demo_data"], clone)
    assert data_version(clone / "data/demo").md5 == md5


def test_invalid_data_stops_repro(clone: Path) -> None:
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["validate"]["min_examples_per_class"] = 10_000
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    done = run(["dvc", "repro"], clone, check=False)

    assert done.returncode != 0
    assert "FAIL classes.min_examples" in done.stdout + done.stderr
    assert not (clone / "models").exists(), "training ran on data that failed validation"
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    # The failed stage's new params were not recorded as a good run.
    assert (
        lock["stages"]["validate"]["params"]["params.yaml"]["validate"]["min_examples_per_class"]
        != 10_000
    )


def test_committed_lock_matches_a_fresh_demo_dataset(tmp_path: Path) -> None:
    """A fresh clone's `dvc repro` regenerates exactly the data version dvc.lock records."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())["demo_data"]
    make_demo_data(
        tmp_path / "demo", n=params["n"], seed=params["seed"], image_size=params["image_size"]
    )
    assert data_version(tmp_path / "demo").md5 == locked_md5(REPO, "demo_data", "data/demo")


TINY_MODEL = {
    "vision": {"arch": "cnn", "hidden_size": 32, "channels": 8},
    "text": {"arch": "embedding", "hidden_size": 32},
    "hidden_dim": 32,
}


@pytest.mark.slow
def test_full_pipeline_train_evaluate_export(clone: Path) -> None:
    params = yaml.safe_load((clone / "params.yaml").read_text())
    for key, value in TINY_MODEL.items():
        params["model"][key] = value
    params["train"].update(epochs=2, min_steps=0, num_workers=0)
    params["evaluate"].update(latency_repeats=3, bootstrap_samples=50)
    params["export"].update(latency_repeats=3)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    trained = run(["dvc", "repro", "train"], clone)
    run(["dvc", "repro"], clone)

    # train depends on validate's report, so `dvc repro train` validated the data first.
    assert "Running stage 'validate'" in trained.stdout
    assert trained.stdout.index("'validate'") < trained.stdout.index("Running stage 'train'")
    train_metrics = json.loads((clone / "metrics/train.json").read_text())
    assert train_metrics["epochs_run"] == 2 and train_metrics["run_id"]
    assert train_metrics["validation"] == "passed"
    evaluation = json.loads((clone / "metrics/evaluate.json").read_text())
    assert 0.0 <= evaluation["accuracy"] <= 1.0 and "ablation.image_only" in evaluation
    assert (clone / "reports/evaluate/confusion_matrix.png").is_file()
    assert (clone / "mlflow.db").is_file()
    shown = json.loads(run(["dvc", "plots", "show", "--json"], clone).stdout)["data"]
    assert "reports/evaluate/confusion_matrix.png" in shown
    # Plots as data too: curves per epoch, confusion per example, calibration per bin.
    for plot in ("loss", "accuracy", "confusion", "calibration"):
        assert shown[plot][0]["content"]["data"]["values"], plot
    assert (clone / "models/train/history.csv").is_file()
    assert (clone / "reports/evaluate/confusion.csv").is_file()
    export = json.loads((clone / "models/export/export.json").read_text())
    assert export["serving"] in ("int8", "fp32", "torch")
    exported = json.loads((clone / "metrics/export.json").read_text())
    assert exported["export.size_ratio_int8_vs_fp32"] < 1
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    assert "export" in lock["stages"]
