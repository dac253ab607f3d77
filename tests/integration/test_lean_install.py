"""The lean serving install (`mmops[serve]`) in a clean venv: no torch, no training stack, and it
serves an exported model over v2 exactly as the training install predicts it."""

from __future__ import annotations

import os
import shutil
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

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from mmops.data.dataset import read_manifest
from mmops.local.stack import LOOPBACK, free_port
from mmops.serving.predictor import Predictor

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# What the serving install must not have: the training, orchestration and data stack.
ABSENT = ("torch", "transformers", "pandas", "prefect", "dvc", "great_expectations", "kafka")


@pytest.fixture(scope="module")
def lean_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with `pip install -c infra/constraints.txt ".[serve]"` (not editable)."""
    work = tmp_path_factory.mktemp("lean")
    # A copy of the source: a non-editable install builds in the tree it is given (build/).
    source = work / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("mmops", "flows"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    pip += ["--disable-pip-version-check", "--no-warn-script-location"]
    constraints = ROOT / "infra" / "constraints.txt"
    done = subprocess.run(
        [*pip, "-c", str(constraints), f"{source}[serve]"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


@pytest.fixture(scope="module")
def exported(
    train_and_export: Callable[..., tuple[str, dict[str, str]]],
    tmp_path_factory: pytest.TempPathFactory,
    mlflow_store: Callable[..., AbstractContextManager[str]],
) -> Path:
    workdir = tmp_path_factory.mktemp("lean-model")
    with mlflow_store(workdir):
        train_and_export("train.epochs=2")
    return workdir / "models" / "export"


def test_the_lean_install_has_no_training_stack(lean_venv: Path) -> None:
    python = str(lean_venv / "bin" / "python")
    for module in ABSENT:
        found = subprocess.run([python, "-c", f"import {module}"], capture_output=True)
        assert found.returncode != 0, f"{module} is installed in the serving venv"
    imports = "import mmops.serving.oip.server, mmops.cli, onnxruntime, tokenizers, mlflow"
    assert subprocess.run([python, "-c", imports], capture_output=True).returncode == 0
    help_text = subprocess.run(
        [str(lean_venv / "bin" / "mmops"), "serve-http", "--help"], capture_output=True, text=True
    )
    assert help_text.returncode == 0 and "--grpc-port" in help_text.stdout


@pytest.fixture(scope="module")
def lean_server(lean_venv: Path, exported: Path) -> Iterator[dict[str, Any]]:
    port, grpc_port = free_port(), free_port()
    command = [str(lean_venv / "bin" / "mmops"), "serve-http", "--model", str(exported)]
    command += ["--host", LOOPBACK, "--port", str(port), "--grpc-port", str(grpc_port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://{LOOPBACK}:{port}/v2/health/ready"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            out = process.stdout.read().decode() if process.stdout else ""
            process.kill()
            pytest.fail(f"the lean server did not start:\n{out[-3000:]}")
        time.sleep(0.3)
    yield {"http": f"{LOOPBACK}:{port}", "grpc": f"{LOOPBACK}:{grpc_port}", "pid": process.pid}
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def _records(demo_dir: Path, n: int) -> list[dict[str, Any]]:
    rows = read_manifest(demo_dir).head(n).to_dict("records")
    return [
        {
            "id": str(row["id"]),
            "text": row["text"] if isinstance(row["text"], str) else None,
            "image": (demo_dir / row["image"]).read_bytes()
            if isinstance(row["image"], str)
            else None,
        }
        for row in rows
    ]


def _inputs(module: Any, records: list[dict[str, Any]]) -> list[Any]:
    columns = {
        "id": [r["id"].encode() for r in records],
        "text": [(r["text"] or "").encode() for r in records],
        "image": [r["image"] or b"" for r in records],
    }
    inputs = []
    for name, values in columns.items():
        tensor = module.InferInput(name, [len(values)], "BYTES")
        tensor.set_data_from_numpy(np.array(values, dtype=np.object_))
        inputs.append(tensor)
    return inputs


def test_the_lean_server_predicts_bit_for_bit_what_the_training_install_predicts(
    lean_server: dict[str, Any], exported: Path, demo_dir: Path
) -> None:
    records = _records(demo_dir, 16)
    predictor = Predictor(exported)
    expected = predictor.predict_batch(records)  # one batch, as the server runs one request
    want = np.array([[e["scores"][label] for label in predictor.labels] for e in expected])
    for module, address in ((httpclient, lean_server["http"]), (grpcclient, lean_server["grpc"])):
        client = module.InferenceServerClient(address)
        result = client.infer(predictor.identity.name, _inputs(module, records))
        labels = [label.decode() for label in result.as_numpy("label")]
        assert labels == [e["label"] for e in expected]
        # the same arrays into the same ONNX model: the same float32 scores, to the bit
        np.testing.assert_array_equal(result.as_numpy("scores"), want.astype(np.float32))
