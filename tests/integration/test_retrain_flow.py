"""The retrain flow against a real Prefect API and a real MLflow registry (SQLite in tmp)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from mmops.config import load_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MMOPS = str(Path(sys.executable).parent / "mmops")
MODEL = "mmops-flow-test"
# A tiny model that learns something in a few epochs, and floors it can clear.
GOOD = (
    "train.epochs=5",
    "train.lr=0.003",
    f"tracking.registered_model={MODEL}",
    "gate.min_accuracy=0.3",
    "gate.max_group_gap=1.0",
    "gate.max_latency_ms=10000",
)
# The same model barely trained: registered, then rejected by the gate.
WORSE = (*GOOD, "train.epochs=1", "train.lr=0.00001")


def set_args(overrides: tuple[str, ...]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def invoke(*args: str, code: int = 0) -> dict[str, Any]:
    """`mmops ARGS` in a subprocess, as a user runs it, against this module's Prefect API."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    done = subprocess.run(
        [MMOPS, *args], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert done.returncode == code, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1]) if "--json" in args else {}


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def workdir(
    demo_dir: Path, prefect_api: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("flow")
    shutil.copytree(demo_dir, work / "data")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
        patch.setenv("MMOPS_LOCK_DIR", str(work / "locks"))
        patch.setenv("MMOPS_USER", "ci")
        yield work


@pytest.fixture(scope="module")
def two_runs(workdir: Path, tiny_overrides: tuple[str, ...]) -> tuple[dict, dict]:
    first = invoke("retrain", "--data", "data", *set_args((*tiny_overrides, *GOOD)), "--json")
    second = invoke("retrain", "--data", "data", *set_args((*tiny_overrides, *WORSE)), "--json")
    return first, second


def client() -> MlflowClient:
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def test_first_run_is_promoted_and_a_worse_one_is_not(two_runs: tuple[dict, dict]) -> None:
    first, second = two_runs

    assert first["promoted"] and first["gate"]["passed"] and first["champion"] == "1"
    assert second["version"] == "2"
    assert not second["promoted"] and not second["gate"]["passed"]
    assert second["champion"] == "1"
    c = client()
    assert str(c.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert str(c.get_model_version_by_alias(MODEL, "challenger").version) == "2"
    rejected = c.get_model_version(MODEL, "2").tags
    assert rejected["mmops.gate.passed"] == "False"
    assert "below champion v1" in rejected["mmops.gate.reasons"]
    assert rejected["mmops.gate.champion"] == "1"


def test_each_run_publishes_its_summary_artifact(two_runs: tuple[dict, dict]) -> None:
    import httpx
    from prefect.settings import PREFECT_API_URL

    # The REST API itself: this client version's read_artifacts sends nulls the server rejects.
    response = httpx.post(
        f"{PREFECT_API_URL.value()}/artifacts/filter",
        json={
            "artifacts": {"key": {"any_": ["retrain-summary"]}},
            "limit": 50,
            "offset": 0,
            "sort": "CREATED_DESC",
        },
        timeout=30,
    )
    response.raise_for_status()
    markdown = [a["data"] for a in response.json()]
    assert any("v2: not promoted" in m and "below champion v1" in m for m in markdown)
    assert any("v1: promoted to champion" in m for m in markdown)
    assert all("| metric | challenger" in m for m in markdown)


def test_versions_carry_data_version_commit_metrics_and_export(
    two_runs: tuple[dict, dict], workdir: Path
) -> None:
    first, _ = two_runs
    tags = client().get_model_version(MODEL, "1").tags
    assert tags["data.md5"] == first["data_md5"]
    assert tags["trigger"] == "manual" and tags["trigger.reason"] == "none"
    assert tags["train.run_id"] == first["run_id"]
    assert float(tags["test.accuracy"]) == pytest.approx(first["accuracy"], abs=1e-6)
    assert tags["export.serving"] == first["serving"]
    assert "git.commit" in tags
    assert tags["mmops.champion.by"] == "ci"
    run = client().get_run(first["run_id"])
    assert run.data.tags["data.md5"] == first["data_md5"]
    # Trained on the data version its own validate task passed, and says so.
    assert run.data.tags["mmops.validation"] == "passed"
    assert run.data.tags["mmops.validation.data_md5"] == first["data_md5"]
    assert run.data.tags["mmops.validation.report"].endswith("/validate/validation.json")


def test_models_promote_and_rollback(two_runs: tuple[dict, dict]) -> None:
    params = ["--set", f"tracking.registered_model={MODEL}"]
    listed = invoke("models", "--json", *params)
    aliases = {v["version"]: v["aliases"] for v in listed["versions"]}
    assert aliases == {"2": ["challenger"], "1": ["champion"]}

    invoke("promote", "2", "--reason", "hand-picked for a test", *params)
    assert str(client().get_model_version_by_alias(MODEL, "champion").version) == "2"
    assert client().get_model_version(MODEL, "2").tags["mmops.champion.reason"] == (
        "hand-picked for a test"
    )

    invoke("rollback", "--reason", "test rollback", *params)
    assert str(client().get_model_version_by_alias(MODEL, "champion").version) == "1"
    history = json.loads(client().get_registered_model(MODEL).tags["mmops.champion_history"])
    assert [(h["action"], h["version"], h["previous"]) for h in history[-2:]] == [
        ("promote", "2", "1"),
        ("rollback", "1", "2"),
    ]


def test_invalid_data_stops_the_flow_and_leaves_the_registry(
    two_runs: tuple[dict, dict], workdir: Path, tiny_overrides: tuple[str, ...]
) -> None:
    broken = workdir / "broken"
    shutil.copytree(workdir / "data", broken)
    first_image = sorted((broken / "images").rglob("*.png"))[0]
    first_image.write_bytes(b"not a png")
    before = [v.version for v in client().search_model_versions(f"name = '{MODEL}'")]
    champion = str(client().get_model_version_by_alias(MODEL, "champion").version)

    result = invoke(
        "retrain", "--data", str(broken), *set_args((*tiny_overrides, *GOOD)), "--json", code=1
    )

    assert not result["promoted"] and "image.decodes" in result["error"]
    after = [v.version for v in client().search_model_versions(f"name = '{MODEL}'")]
    assert sorted(after) == sorted(before)
    assert str(client().get_model_version_by_alias(MODEL, "champion").version) == champion


def test_concurrent_gates_leave_a_consistent_champion(
    two_runs: tuple[dict, dict], workdir: Path, tiny_overrides: tuple[str, ...]
) -> None:
    from mmops.tracking import registry

    params = load_params(None, [*tiny_overrides, *GOOD, "gate.max_regression=1.0"])
    outcomes: list[tuple[str, bool]] = []

    def gate(version: str) -> None:
        _, promoted = registry.gate_and_promote(MODEL, version, "data", params, "race")
        outcomes.append((version, promoted))

    threads = [threading.Thread(target=gate, args=(v,)) for v in ("1", "2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    history = registry.history(MODEL)
    # Each move names the champion it replaced: the log is one chain, never a fork.
    for before, after in itertools.pairwise(history):
        assert after["previous"] == before["version"]
    assert registry.champion_version(MODEL) == history[-1]["version"]
    assert {v for v, _ in outcomes} == {"1", "2"}


def test_monthly_deployment_serves_and_runs(
    two_runs: tuple[dict, dict], workdir: Path, tiny_overrides: tuple[str, ...]
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    serve = subprocess.Popen(
        [
            MMOPS,
            "schedule",
            "--data",
            "data",
            *set_args((*tiny_overrides, *GOOD, "train.epochs=1")),
        ],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deployment = _wait_for_deployment("retrain_and_evaluate/monthly", get_client)
        [schedule] = deployment.schedules
        assert schedule.schedule.cron == "0 3 1 * *"
        assert schedule.schedule.timezone == "UTC"
        assert schedule.active

        flow_run = run_deployment("retrain_and_evaluate/monthly", timeout=300)

        assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state
        assert flow_run.parameters["trigger"] == "schedule"  # recorded on the version it registers
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()


def _wait_for_deployment(name: str, get_client: Any) -> Any:
    import asyncio

    async def read() -> Any:
        async with get_client() as c:
            return await c.read_deployment_by_name(name)

    deadline = time.monotonic() + 120
    while True:
        try:
            return asyncio.run(read())
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def test_a_second_promotion_waits_for_the_slot_the_first_holds(prefect_api: None) -> None:
    """The flow's gate holds a Prefect global concurrency limit: strict across hosts."""
    from mmops_flows.support import promotion_slot

    with (
        promotion_slot("slot-test"),  # created on first use, then held
        pytest.raises(TimeoutError),
        promotion_slot("slot-test", timeout_s=1),
    ):
        pytest.fail("took a slot another holder has")
    with promotion_slot("slot-test", timeout_s=10):  # released: free again
        pass
