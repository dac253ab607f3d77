"""Holders of the promotion lease that die or stall: a real registry (SQLite), real processes
killed with SIGKILL, the real CLI."""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from mmops.cli import app
from mmops.tracking import lease
from mmops.tracking.lease import LEASE_TAG, Lease

pytestmark = pytest.mark.integration

_names = itertools.count()

# A holder in its own process: claims the lease (as `host` when given), says so, holds it.
HOLDER = """
import socket, sys, time
from mlflow import MlflowClient
from mmops.tracking import lease
name, host, ttl, hold = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
if host:
    socket.gethostname = lambda: host
lease.SETTLE_S, lease.TTL_S, lease.RENEW_S = 0.1, ttl, ttl / 4
with lease.promotion_lease(MlflowClient(), name):
    print("held", flush=True)
    time.sleep(hold)
"""


@pytest.fixture(scope="module")
def store(
    tmp_path_factory: pytest.TempPathFactory,
    mlflow_store: Callable[..., AbstractContextManager[str]],
) -> Iterator[Path]:
    """One SQLite store for the module (its migrations take seconds); each test its own model."""
    workdir = tmp_path_factory.mktemp("lease")
    with mlflow_store(workdir, workdir / "locks"):
        # The clients of this process too: an earlier module's set_tracking_uri outranks the
        # variable, which the holder processes read.
        mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
        mlflow.MlflowClient().search_registered_models()  # migrate once, before any holder
        yield workdir


@pytest.fixture(autouse=True)
def quick_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease, "SETTLE_S", 0.1)
    monkeypatch.setattr(lease, "POLL_S", 0.1)


@pytest.fixture
def client(store: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


@pytest.fixture
def name(client: mlflow.MlflowClient) -> str:
    name = f"leased-{next(_names)}"
    client.create_registered_model(name)
    return name


def start_holder(
    name: str, store: Path, host: str = "", ttl_s: float = 60, hold_s: float = 600
) -> subprocess.Popen[str]:
    """A holder process, returned once it holds the lease."""
    with (store / f"{name}.log").open("w") as log_file:
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, name, host, str(ttl_s), str(hold_s)],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
    assert holder.stdout is not None
    ready, _, _ = select.select([holder.stdout], [], [], 60)
    line = holder.stdout.readline() if ready else ""
    if line.strip() != "held":
        holder.kill()
        pytest.fail(f"the holder did not take the lease: {(store / f'{name}.log').read_text()}")
    return holder


def far_lease(expires_in_s: float) -> Lease:
    now = time.time()
    return Lease(
        owner="far-host:4242:abc",
        expires=now + expires_in_s,
        host="far-host",
        pid=4242,
        started=123,
        claimed=now - 100,
    )


def takeovers(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "taking over" in r.getMessage()
    ]


def test_a_holder_killed_with_sigkill_is_taken_over_at_once(
    name: str,
    client: mlflow.MlflowClient,
    store: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    holder = start_holder(name, store)
    held = Lease.parse(client.get_registered_model(name).tags[LEASE_TAG])
    assert held is not None and held.pid == holder.pid and held.host == socket.gethostname()
    holder.kill()
    holder.wait()
    # A lease that waits out its holder's TTL fails here instead of hanging the test.
    monkeypatch.setattr(lease, "WAIT_S", 15.0)

    start = time.monotonic()
    with lease.promotion_lease(client, name):
        took = time.monotonic() - start
        mine = Lease.parse(client.get_registered_model(name).tags[LEASE_TAG])

    assert took < 15
    assert mine is not None and mine.pid == os.getpid()
    (warning,) = takeovers(caplog)
    assert f"{socket.gethostname()} pid {holder.pid}" in warning and "not running" in warning
    assert LEASE_TAG not in client.get_registered_model(name).tags


def test_a_lease_of_another_host_is_waited_for_until_it_is_no_longer_renewed(
    name: str,
    client: mlflow.MlflowClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(lease, "TTL_S", 3.0)
    client.set_registered_model_tag(name, LEASE_TAG, far_lease(lease.TTL_S).to_json())
    caplog.set_level(logging.INFO, logger=lease.__name__)

    start = time.monotonic()
    with lease.promotion_lease(client, name):
        took = time.monotonic() - start

    assert 2.5 < took < 10
    waiting = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert waiting and "far-host pid 4242" in waiting[0]
    assert f"`mmops lease release {name} --force`" in waiting[0]
    (warning,) = takeovers(caplog)
    assert "far-host pid 4242" in warning and "expired" in warning


def test_a_live_holder_on_another_host_keeps_its_lease_past_the_ttl(
    name: str,
    client: mlflow.MlflowClient,
    store: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(lease, "TTL_S", 2.0)
    holder = start_holder(name, store, host="far-host", ttl_s=lease.TTL_S, hold_s=5.0)

    start = time.monotonic()
    with lease.promotion_lease(client, name):
        took = time.monotonic() - start
    holder.wait(timeout=30)

    assert took > 4.0  # the holder's 5 s, not its 2 s TTL
    assert holder.returncode == 0
    assert "no longer ours" not in (store / f"{name}.log").read_text()
    assert not takeovers(caplog)


def test_lease_release_frees_a_lease_only_with_force(
    name: str, client: mlflow.MlflowClient
) -> None:
    client.set_registered_model_tag(name, LEASE_TAG, far_lease(60).to_json())
    runner = CliRunner()

    refused = runner.invoke(app, ["lease", "release", name])
    assert refused.exit_code == 2, refused.output
    (error,) = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert "far-host pid 4242" in error
    assert any(
        line.startswith("hint:") and "--force" in line for line in refused.stderr.splitlines()
    )
    assert LEASE_TAG in client.get_registered_model(name).tags

    freed = runner.invoke(app, ["lease", "release", name, "--force"])
    assert freed.exit_code == 0, freed.output
    assert "released" in freed.stdout and "far-host pid 4242" in freed.stdout
    assert LEASE_TAG not in client.get_registered_model(name).tags

    again = runner.invoke(app, ["lease", "release", name, "--force"])
    assert again.exit_code == 0 and "no promotion lease" in again.stdout
    missing = runner.invoke(app, ["lease", "release", "no-such-model"])
    assert missing.exit_code == 2 and "no-such-model" in missing.stderr
