"""Tracking-server outages that end clearly: a real `mlflow server` killed (SIGKILL) or hung
(SIGSTOP) under the real CLI, and a run whose process was killed, closed by `mmops doctor`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mmops.local.stack import LOOPBACK, free_port, wait_for_port
from mmops.tracking.deadlines import HTTP_SETTINGS
from mmops.tracking.orphans import ORPHAN_TAG, PID_TAG, RUN_CONTEXT

pytestmark = pytest.mark.integration

# Small deadlines, so a dead server fails a command in seconds rather than minutes.
DEADLINES = ("--set", "tracking.request_timeout_s=2", "--set", "tracking.max_retries=1")
# A process that starts a run the way the pipeline's stages do, prints its id and waits.
START_RUN = """
import time, mlflow
from mmops.config import load_params
from mmops.tracking.runs import configure
configure(load_params(None, []))
print(mlflow.start_run(run_name="stuck").info.run_id, flush=True)
time.sleep(600)
"""


class Server:
    """`python -m mlflow server` on one port, which the tests kill, hang and start again."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://{LOOPBACK}:{self.port}"
        self.process: subprocess.Popen | None = None

    def up(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--default-artifact-root", (self.root / "mlruns").as_uri(),
            "--no-serve-artifacts", "--host", LOOPBACK, "--port", str(self.port),
            "--workers", "1",
        ]  # fmt: skip
        with (self.root / "mlflow.log").open("ab") as log:
            # Its own process group: the server runs its workers as children.
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for_port(self.port, 90, self.process)

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, sig)
        if sig == signal.SIGKILL:
            self.process.wait(10)
            self.process = None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("tracking"))
    running.up()
    yield running
    if running.process is not None:
        running.signal(signal.SIGCONT)
        running.signal(signal.SIGKILL)


@pytest.fixture
def env(server: Server) -> dict[str, str]:
    """The environment of the commands: the server, and no deadline or run tag of this process."""
    env = {k: v for k, v in os.environ.items() if k not in {*HTTP_SETTINGS.values(), RUN_CONTEXT}}
    env.pop("MMOPS_DEBUG", None)
    return {**env, "MLFLOW_TRACKING_URI": server.uri}


def mmops(env: dict[str, str], cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "mmops.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done, time.monotonic() - started


def assert_one_error_line(done: subprocess.CompletedProcess, uri: str, cause: str) -> None:
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1, done.stderr
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith(f"error: MLflow tracking server {uri}: unreachable ({cause}")
    assert " while calling " in errors[0]
    assert sum(line.startswith("hint:") for line in done.stderr.splitlines()) == 1
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["summary", "doctor"])
def test_a_killed_tracking_server_fails_a_command_in_seconds_with_one_error_line(
    server: Server, env: dict[str, str], tmp_path: Path, command: str
) -> None:
    server.up()
    server.signal(signal.SIGKILL)
    done, took = mmops(env, tmp_path, command, *DEADLINES)
    assert_one_error_line(done, server.uri, "connection refused")
    assert took < 30, f"{took:.1f}s"
    print(f"mmops {command} against a killed server: exit 1 after {took:.1f}s")


def test_a_hung_tracking_server_fails_a_command_within_its_deadlines(
    server: Server, env: dict[str, str], tmp_path: Path
) -> None:
    server.up()
    server.signal(signal.SIGSTOP)  # the port still accepts connections; nothing answers
    try:
        done, took = mmops(env, tmp_path, "doctor", *DEADLINES)
    finally:
        server.signal(signal.SIGCONT)
    assert_one_error_line(done, server.uri, "timed out: 2 tries of 2 s")
    assert 4 <= took < 30, f"{took:.1f}s"
    print(f"mmops doctor against a hung server: exit 1 after {took:.1f}s")


def test_a_run_whose_process_was_killed_stays_running_until_doctor_marks_it_failed(
    server: Server, env: dict[str, str], tmp_path: Path
) -> None:
    server.up()
    starters: list[subprocess.Popen] = []
    try:
        ids = []
        for _ in range(2):  # one after the other: the first creates the experiment
            starters.append(
                subprocess.Popen(
                    [sys.executable, "-c", START_RUN],
                    env=env,
                    cwd=tmp_path,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
            ids.append(starters[-1].stdout.readline().strip())  # type: ignore[union-attr]
        (killed, _), (killed_id, alive_id) = starters, ids
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        client = MlflowClient(server.uri)
        run = client.get_run(killed_id)
        assert run.info.status == "RUNNING"
        assert run.data.tags[PID_TAG] == str(killed.pid)

        server.signal(signal.SIGKILL)  # the outage ends: the same server, on the same port
        server.up()
        listed, _ = mmops(env, tmp_path, "doctor", "--dry-run")
        assert listed.returncode == 0, listed.stderr
        assert killed_id in listed.stdout and alive_id not in listed.stdout
        assert client.get_run(killed_id).info.status == "RUNNING"

        closed, _ = mmops(env, tmp_path, "doctor")
        assert closed.returncode == 0, closed.stderr
        assert f"{killed_id} stuck: process {killed.pid} on " in closed.stdout
        after = client.get_run(killed_id)
        assert after.info.status == "FAILED"
        assert after.data.tags[ORPHAN_TAG].startswith(f"process {killed.pid} on ")
        assert client.get_run(alive_id).info.status == "RUNNING"  # its process still runs
    finally:
        for process in starters:
            process.kill()
            process.wait(10)
