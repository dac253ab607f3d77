"""Damaged model files, refused cleanly: a real registry (SQLite), real files truncated or deleted
where the store keeps them, the real CLI in a subprocess."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from mmops.config import PredictConfig
from mmops.model.digests import DIGESTS_FILE, write_manifest
from mmops.model.storage import META_FILE
from mmops.serving.champion import ModelSource
from mmops.serving.integrity import DIGESTS_TAG, DamagedModelError
from mmops.serving.predictor import Predictor
from mmops.serving.runners import EXPORT_FILE, ONNX_FILES
from mmops.tracking import registry

pytestmark = pytest.mark.integration

MODEL = "faulty"


@dataclass(frozen=True)
class Store:
    workdir: Path
    env: dict[str, str]
    data: Path
    approved: str  # the backend v1's export approved

    def folder(self, version: str) -> Path:
        """Where the store keeps a version's model folder: what an operator's disk fault hits."""
        root = Path(mlflow.MlflowClient().get_model_version_download_uri(MODEL, version))
        return next(p.parent for p in root.rglob(META_FILE))


@pytest.fixture(scope="module")
def store(
    demo_dir: Path,
    train_and_export: Callable[..., tuple[str, dict[str, str]]],
    tmp_path_factory: pytest.TempPathFactory,
    mlflow_store: Callable[..., AbstractContextManager[str]],
) -> Iterator[Store]:
    """A tiny model trained and exported: v1 (the export, champion) and v2 (the torch model)."""
    workdir = tmp_path_factory.mktemp("faults")
    with mlflow_store(workdir) as uri:
        train_uri, result = train_and_export("train.epochs=2")
        assert registry.register(result["model_uri"], MODEL, {}) == "1"
        assert registry.register(train_uri, MODEL, {}) == "2"
        registry.promote(MODEL, "1", "first champion")
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MMOPS_LOCK_DIR": str(workdir)}
        yield Store(workdir, env, demo_dir, result["serving"])


@contextmanager
def damaged(path: Path, how: str) -> Iterator[None]:
    """`path` truncated to half or deleted for the block, then put back."""
    backup = path.with_name(path.name + ".bak")
    shutil.copy2(path, backup)
    try:
        if how == "truncate":
            os.truncate(path, path.stat().st_size // 2)
        else:
            path.unlink()
        yield
    finally:
        shutil.move(backup, path)


def approved_file(store: Store) -> str:
    assert store.approved in ONNX_FILES, "the tiny export serves ONNX"
    return ONNX_FILES[store.approved]


def mmops(store: Store, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmops.cli", *args],
        cwd=store.workdir,
        env=store.env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_refused(done: subprocess.CompletedProcess, file: str) -> None:
    """One `error:` line naming the version and the file, a hint to roll back, no traceback."""
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert f"models:/{MODEL}/1: {file}:" in errors[0]
    hints = [line for line in done.stderr.splitlines() if line.startswith("hint:")]
    assert len(hints) == 1 and "mmops rollback" in hints[0]
    assert "Traceback" not in done.stderr + done.stdout


def test_registration_records_every_file_digest_in_a_tag(store: Store) -> None:
    tags = mlflow.MlflowClient().get_model_version(MODEL, "1").tags
    recorded = json.loads(tags[DIGESTS_TAG])
    manifest = json.loads((store.folder("1") / DIGESTS_FILE).read_text())
    assert recorded == manifest["files"]
    assert {EXPORT_FILE, *ONNX_FILES.values(), "model.safetensors", META_FILE} <= set(recorded)


def test_predict_and_evaluate_refuse_a_truncated_onnx_file_in_one_line(store: Store) -> None:
    name = approved_file(store)
    with damaged(store.folder("1") / name, "truncate"):
        predicted = mmops(
            store,
            *("predict", "--model", f"models:/{MODEL}/1", "--data", str(store.data)),
            *("--split", "test", "--out", "out.jsonl"),
        )
        assert_refused(predicted, name)
        assert "sha256 mismatch" in predicted.stderr
        evaluated = mmops(
            store, "evaluate", "--model", f"models:/{MODEL}/1", "--data", str(store.data)
        )
        assert_refused(evaluated, name)


def test_auto_refuses_a_deleted_approved_file_and_falls_back_only_when_told(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    name = approved_file(store)
    fallback = "torch" if store.approved == "fp32" else "fp32"
    with damaged(store.folder("1") / name, "delete"):
        with pytest.raises(DamagedModelError) as refused:
            Predictor.load(f"models:/{MODEL}/1", "auto", PredictConfig())
        assert refused.value.file == name and refused.value.source == f"models:/{MODEL}/1"
        assert "missing" in str(refused.value) and "mmops rollback" in str(refused.value)
        with caplog.at_level(logging.WARNING, logger="mmops.serving.predictor"):
            served = Predictor.load(
                f"models:/{MODEL}@champion", "auto", PredictConfig(fallback_backend=fallback)
            )
    assert served.backend == fallback and served.identity.version == "1"
    warning = next(r.getMessage() for r in caplog.records if "instead of" in r.getMessage())
    assert f"serving {fallback} instead of {store.approved}" in warning and name in warning


def test_a_manifest_altered_to_match_a_damaged_file_is_caught_by_the_tag(store: Store) -> None:
    folder = store.folder("1")
    manifest = folder / DIGESTS_FILE
    original = manifest.read_text()
    files = json.loads(original)["files"]
    try:
        # An attacker or a bad sync rewrites the manifest for a file it changed.
        write_manifest(folder, {**files, EXPORT_FILE: "0" * 64}, None)
        with pytest.raises(DamagedModelError) as refused:
            Predictor.load(f"models:/{MODEL}/1", "auto", PredictConfig())
    finally:
        manifest.write_text(original)
    assert refused.value.file == DIGESTS_FILE and "recorded at registration" in str(refused.value)


def test_the_stream_waits_out_a_damaged_champion_and_serves_once_the_alias_moves(
    store: Store,
) -> None:
    source = ModelSource(f"models:/{MODEL}@champion", PredictConfig(), poll_s=0.2)
    failures: list[tuple[str, str]] = []
    source.on_failure = lambda stage, version: failures.append((stage, version))
    stop, beats = threading.Event(), []
    loaded: list[Predictor | None] = []
    waiter = threading.Thread(
        target=lambda: loaded.append(source.load(stop, lambda: beats.append(1)))
    )
    try:
        with damaged(store.folder("1") / approved_file(store), "truncate"):
            waiter.start()
            until(lambda: ("damaged", "1") in failures and len(beats) >= 2)
            assert waiter.is_alive() and not source.loaded  # waiting, not crashed
            assert source.waiting_for is not None and approved_file(store) in source.waiting_for
            registry.promote(MODEL, "2", "v1 is damaged")
            waiter.join(timeout=60)
        assert not waiter.is_alive()
        assert loaded[0] is not None and loaded[0].identity.version == "2" and source.loaded
        assert set(failures) == {("damaged", "1")}
    finally:
        stop.set()
        source.close()
        waiter.join(timeout=10)
        registry.promote(MODEL, "1", "v1 restored")


def test_a_model_without_digests_loads_with_a_warning_unless_they_are_required(
    untrained_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = shutil.copytree(untrained_model_dir, tmp_path / "old")
    (old / DIGESTS_FILE).unlink()  # saved before digests were recorded
    with caplog.at_level(logging.WARNING, logger="mmops.serving.integrity"):
        assert Predictor(old).backend == "torch"
    assert any("no digests recorded" in r.getMessage() for r in caplog.records)
    with pytest.raises(DamagedModelError, match="require_digests"):
        Predictor(old, config=PredictConfig(require_digests=True))


def test_damaged_weights_in_a_local_folder_are_refused_before_loading(
    untrained_model_dir: Path, tmp_path: Path
) -> None:
    folder = shutil.copytree(untrained_model_dir, tmp_path / "model")
    os.truncate(folder / "model.safetensors", 100)
    with pytest.raises(DamagedModelError) as refused:
        Predictor(folder)
    assert refused.value.file == "model.safetensors" and str(folder) in str(refused.value)


def until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
