"""`mlflow models serve` of the registered champion answers `/invocations` as
`Predictor.predict_batch` does: the pyfunc stays a thin adapter over the one prediction path."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from mmops.data.dataset import read_manifest
from mmops.local.stack import LOOPBACK, free_port
from mmops.serving.predictor import Predictor
from mmops.tracking import registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "mmops-mlflow-serving-test"
CHAMPION = f"models:/{MODEL}@champion"
# The model's download, the package on its code path and uvicorn's start, on a busy machine.
START_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def champion(
    train_and_export: Callable[..., tuple[str, dict[str, str]]],
    tmp_path_factory: pytest.TempPathFactory,
    mlflow_store: Callable[..., AbstractContextManager[str]],
) -> Iterator[Path]:
    """A tiny model trained, exported and registered as the champion, in a store of its own;
    the working folder, whose environment (MLFLOW_TRACKING_URI) the server inherits."""
    workdir = tmp_path_factory.mktemp("mlflow-serving")
    with mlflow_store(workdir):
        _, exported = train_and_export()
        version = registry.register(exported["model_uri"], MODEL, {})
        registry.promote(MODEL, version, "the champion mlflow models serve serves")
        yield workdir


def wait_for_ping(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow models serve exited {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve not up in {START_TIMEOUT_S} s:\n{log.read_text()}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """The CLI and the uvicorn workers it starts: the whole process group."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):  # workers left behind by a CLI that exited
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(champion: Path) -> Iterator[str]:
    """`mlflow models serve` of the champion, in this environment; its base URL."""
    port = free_port()
    log = champion / "mlflow-serve.log"
    mlflow_cli = [sys.executable, "-m", "mlflow", "models", "serve", "-m", CHAMPION]
    options = ["--env-manager", "local", "--host", LOOPBACK, "-p", str(port), "--workers", "1"]
    # MLflow runs `uvicorn` by name: this interpreter's scripts first, as in an activated venv.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*mlflow_cli, *options],
            cwd=champion,
            env={**os.environ, "PATH": path},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://{LOOPBACK}:{port}"
    try:
        wait_for_ping(url, process, log)
        yield url
    finally:
        stop(process)


def encode(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def records(data_dir: Path) -> list[dict[str, Any]]:
    """Base64 images as the pyfunc takes them, a missing image, and an image given as a path
    to a real file on the server: a row the server must refuse, not read."""
    rows = read_manifest(data_dir).head(6).to_dict("records")
    served = [
        {"id": str(r["id"]), "text": r["text"], "image": encode(data_dir / r["image"])}
        for r in rows
    ]
    path = str((data_dir / rows[0]["image"]).resolve())
    return [
        *served,
        {"id": "no-image", "text": rows[1]["text"], "image": None},
        {"id": "path", "text": rows[2]["text"], "image": path},
    ]


def invoke(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        return json.loads(response.read())["predictions"]


def test_invocations_predict_as_predict_batch_and_refuse_a_path_per_row(
    server: str, demo_dir: Path
) -> None:
    sent = records(demo_dir)
    predictor = Predictor.load(CHAMPION)

    served = invoke(server, {"dataframe_records": sent})
    local = predictor.predict_batch(sent)

    assert [row["id"] for row in served] == [r["id"] for r in sent]
    for row, expected in zip(served, local, strict=True):
        where = row["id"]
        assert row["error"] == expected.get("error", ""), where
        assert row["label"] == expected.get("label", ""), where
        for label in predictor.labels:
            score = row[f"score_{label}"]
            if "scores" in expected:
                assert score == pytest.approx(expected["scores"][label], abs=1e-6), where
            else:
                assert score is None or math.isnan(score), where
    by_id = {row["id"]: row for row in served}
    assert "path" in by_id["path"]["error"] and by_id["path"]["label"] == ""
    assert by_id["no-image"]["error"] == "" and by_id["no-image"]["label"] in predictor.labels
    assert sum(row["error"] == "" for row in served) == len(sent) - 1


def test_invocations_take_the_split_orientation_too(server: str, demo_dir: Path) -> None:
    sent = records(demo_dir)[:3]
    columns = ["id", "text", "image"]
    split = {"columns": columns, "data": [[r[c] for c in columns] for r in sent]}

    assert invoke(server, {"dataframe_split": split}) == invoke(server, {"dataframe_records": sent})
