"""Tracking-server outages, the pure parts: the deadlines in params, their MLflow settings, the
one line an outage prints, and which RUNNING runs have no process behind them any more."""

from __future__ import annotations

import errno
import os

import pytest
from mlflow.exceptions import MlflowException

from mmops.cli.common import explain
from mmops.config import ConfigError, TrackingConfig, load_params
from mmops.tracking import deadlines
from mmops.tracking.deadlines import (
    HTTP_SETTINGS,
    apply_deadlines,
    http_environment,
    outage,
    worst_case_s,
)
from mmops.tracking.orphans import RunActivity, orphan_reason, process_alive

REFUSED = (
    "API request to http://ops:s3cret@mlflow.internal:5000/api/2.0/mlflow/model-versions/search "
    "failed with exception HTTPConnectionPool(host='mlflow.internal', port=5000): Max retries "
    "exceeded with url: /api/2.0/mlflow/model-versions/search (Caused by NewConnectionError("
    "\"HTTPConnection(host='mlflow.internal', port=5000): Failed to establish a new connection: "
    '[Errno 111] Connection refused"))'
)
HUNG = (
    "API request to http://127.0.0.1:5000/api/2.0/mlflow/registered-models/get failed with "
    "exception HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded with url: "
    '/api/2.0/mlflow/registered-models/get?name=x (Caused by ReadTimeoutError("HTTPConnectionPool'
    "(host='127.0.0.1', port=5000): Read timed out. (read timeout=2)\"))"
)


@pytest.fixture
def clean_http_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in HTTP_SETTINGS.values():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(deadlines, "_applied", {})


def test_the_default_deadlines_give_up_on_a_hung_server_in_about_three_minutes() -> None:
    cfg = TrackingConfig()
    worst = worst_case_s(cfg.request_timeout_s, cfg.max_retries, cfg.backoff_factor, 1.0)
    assert worst == 6 * 20 + (4 + 1) + (8 + 1) + (16 + 1) + (32 + 1) == 184
    # A refused connection fails each try at once: the waits alone, a restart's minute.
    assert 55 < worst_case_s(0, cfg.max_retries, cfg.backoff_factor, 0.0) + 0 <= 65
    # MLflow's own defaults (120 s, 7 retries, factor 2, jitter 1) wait about 20 minutes.
    assert 19 * 60 < worst_case_s(120, 7, 2, 1.0) < 21 * 60


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("tracking.request_timeout_s=0", "tracking.request_timeout_s"),
        ("tracking.max_retries=11", "tracking.max_retries"),
        ("tracking.max_retries=-1", "tracking.max_retries"),
        ("tracking.backoff_factor=121", "tracking.backoff_factor"),
        ("tracking.backoff_jitter=-0.5", "tracking.backoff_jitter"),
        ("tracking.orphan_after_s=10", "tracking.orphan_after_s"),
        ("tracking.backoff_factor=0.5", "tracking.backoff_factor"),  # MLflow reads an int
    ],
)
def test_a_bad_deadline_is_refused_naming_its_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_params(None, [override])


def test_the_deadlines_map_to_mlflows_http_settings() -> None:
    cfg = load_params(None, ["tracking.request_timeout_s=2", "tracking.max_retries=1"]).tracking
    assert http_environment(cfg) == {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0",
    }


@pytest.mark.usefixtures("clean_http_env")
def test_a_later_params_changes_the_deadlines_this_process_set() -> None:
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_TIMEOUT

    apply_deadlines(TrackingConfig())
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 20
    apply_deadlines(TrackingConfig(request_timeout_s=2))
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 2  # read per request: clients made before see it


@pytest.mark.usefixtures("clean_http_env")
def test_a_deadline_set_in_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    in_force = apply_deadlines(TrackingConfig(max_retries=1, request_timeout_s=2))
    assert in_force["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
    assert (
        in_force["MLFLOW_HTTP_REQUEST_TIMEOUT"] == os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "2"
    )


def test_a_refused_connection_is_one_line_naming_the_server_without_its_password() -> None:
    error = explain(MlflowException(REFUSED), {})
    assert error is not None and error.code == 1
    assert str(error) == (
        "MLflow tracking server http://mlflow.internal:5000: unreachable (connection refused) "
        "while calling model-versions/search"
    )
    assert "s3cret" not in str(error) + error.hint and "ops:" not in str(error)
    assert "MLFLOW_TRACKING_URI" in error.hint


DROPPED_UPLOAD = (
    "API request to http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/"
    "model.onnx failed with exception HTTPConnectionPool(host='127.0.0.1', port=5000): Max "
    "retries exceeded with url: /api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/model.onnx "
    "(Caused by ProtocolError('Connection aborted.', ConnectionResetError(104, 'Connection reset "
    "by peer')))"
)


def test_an_upload_the_server_drops_is_an_artifact_store_error_not_an_outage() -> None:
    error = explain(MlflowException(DROPPED_UPLOAD), {})
    assert error is not None and error.code == 1
    assert str(error) == (
        "MLflow tracking server http://127.0.0.1:5000: storing artifacts/1/abc/artifacts/"
        "model.onnx failed (connection dropped); its artifact store may be full or not writable"
    )
    assert "free space" in error.hint


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_a_write_the_disk_refuses_names_the_file_wherever_it_was_raised(code: int) -> None:
    try:
        try:
            raise OSError(code, os.strerror(code), "/mlruns/1/abc/artifacts/model.onnx")
        except OSError as disk:
            raise MlflowException("failed to log artifact") from disk
    except MlflowException as wrapped:
        error = explain(wrapped, {})
    assert error is not None and error.code == 1
    assert str(error) == f"/mlruns/1/abc/artifacts/model.onnx: {os.strerror(code)}"


def test_a_hung_server_is_a_timeout_with_the_deadlines_in_force(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    found = outage(MlflowException(HUNG), "http://127.0.0.1:5000")
    assert found is not None
    assert (found.server, found.endpoint) == ("http://127.0.0.1:5000", "registered-models/get")
    assert found.cause == "timed out: 2 tries of 2 s"


def test_an_outage_wrapped_by_another_error_is_still_the_outage() -> None:
    class RegistryError(RuntimeError):
        pass

    try:
        try:
            raise MlflowException(REFUSED)
        except MlflowException:
            raise RegistryError("mmops-classifier has no champion") from None
    except RegistryError as wrapped:
        found = outage(wrapped, "http://mlflow.internal:5000")
    assert found is not None and found.cause == "connection refused"


def test_a_bare_requests_error_counts_only_for_the_tracking_server() -> None:
    import requests

    def refused(url: str) -> requests.ConnectionError:
        return requests.ConnectionError("[Errno 111] Connection refused", request=_Request(url))

    to_server = outage(
        refused("https://ml.example:8443/api/2.0/mlflow/runs/get"), "https://ml.example:8443"
    )
    assert to_server is not None and to_server.endpoint == "runs/get"
    assert outage(refused("https://huggingface.co/api/models/x"), "https://ml.example:8443") is None


def test_other_mlflow_errors_are_no_outage() -> None:
    missing = MlflowException("Registered Model with name=x not found")
    assert outage(missing, "http://127.0.0.1:5000") is None
    assert outage(ValueError("boom"), "http://127.0.0.1:5000") is None


class _Request:
    def __init__(self, url: str) -> None:
        self.url = url


HOUR_MS = 3600 * 1000
NOW = 100 * HOUR_MS


def activity(**changes: object) -> RunActivity:
    base = {
        "run_id": "r1",
        "name": "train-ffc43c92",
        "host": "gpu-1",
        "pid": 4242,
        "pid_started": 1.0,
        "reopened": False,
        "last_active_ms": NOW - HOUR_MS,
    }
    return RunActivity(**{**base, **changes})  # type: ignore[arg-type]


def never(pid: int, started: float | None) -> bool:
    raise AssertionError("a run of another host is not judged by its pid")


def test_a_run_whose_process_on_this_host_is_gone_is_orphaned_at_once() -> None:
    reason = orphan_reason(activity(), "gpu-1", NOW, 6 * 3600, alive=lambda pid, t: False)
    assert reason == "process 4242 on gpu-1 is gone"


def test_a_run_whose_process_on_this_host_runs_is_left_even_when_idle() -> None:
    old = activity(last_active_ms=0)
    assert orphan_reason(old, "gpu-1", NOW, 6 * 3600, alive=lambda pid, t: True) is None


def test_a_run_of_another_host_is_orphaned_only_after_orphan_after_s_idle() -> None:
    assert orphan_reason(activity(), "cpu-7", NOW, 6 * 3600, alive=never) is None
    idle = activity(last_active_ms=NOW - 7 * HOUR_MS)
    reason = orphan_reason(idle, "cpu-7", NOW, 6 * 3600, alive=never)
    assert reason == "no update for 7.0 h from a run on gpu-1 (tracking.orphan_after_s=21600)"


def test_a_reopened_run_is_judged_by_its_activity_not_by_its_creators_pid() -> None:
    # evaluate reopens the training run from another process; the dead trainer's pid says nothing
    reopened = activity(reopened=True)
    assert orphan_reason(reopened, "gpu-1", NOW, 6 * 3600, alive=never) is None


def test_a_run_with_no_host_recorded_is_judged_by_its_activity() -> None:
    legacy = activity(host=None, pid=None, last_active_ms=NOW - 8 * HOUR_MS)
    assert "with no host recorded" in orphan_reason(legacy, "gpu-1", NOW, 6 * 3600, alive=never)


def test_a_pid_reused_by_another_process_is_not_alive() -> None:
    import psutil

    me = psutil.Process()
    assert process_alive(me.pid, me.create_time())
    assert not process_alive(me.pid, me.create_time() - 3600)
