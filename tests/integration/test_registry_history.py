"""Promotion, rollback and registration against a real MLflow registry (SQLite in tmp)."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow.entities import LoggedModelStatus

from mmops.tracking import lease, registry
from mmops.tracking.registry import RegistryError, champion_version, promote, register, rollback

pytestmark = pytest.mark.integration

_names = itertools.count()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One SQLite store for the module (its migrations take seconds); each test its own model."""
    workdir = tmp_path_factory.mktemp("registry")
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
        patch.setenv("MMOPS_LOCK_DIR", str(workdir / "locks"))
        patch.setenv("MMOPS_USER", "tester")
        yield workdir
    mlflow.set_tracking_uri(previous_uri)


@pytest.fixture(autouse=True)
def quick_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease, "SETTLE_S", 0.05)
    monkeypatch.setattr(lease, "POLL_S", 0.01)


@pytest.fixture
def client(store: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")


@pytest.fixture
def name(store: Path) -> str:
    return f"model-{next(_names)}"


@pytest.fixture
def logged_model(client: mlflow.MlflowClient, store: Path) -> Callable[[], str]:
    """A new logged model's URI: the cheapest thing MLflow 3 registers a version from."""
    experiment = client.get_experiment_by_name("registry-tests")
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment("registry-tests", str(store / "artifacts"))
    )

    def make() -> str:
        run = client.create_run(experiment_id)
        model = client.create_logged_model(experiment_id, source_run_id=run.info.run_id)
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        return f"models:/{model.model_id}"

    return make


def versions(name: str, logged_model: Callable[[], str], n: int) -> list[str]:
    return [register(logged_model(), name, {}) for _ in range(n)]


def crash_after(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next call of MlflowClient.`method` takes effect, then the process 'dies'."""
    real = getattr(mlflow.MlflowClient, method)
    calls: list[Any] = []

    def once(self: mlflow.MlflowClient, *args: Any, **kwargs: Any) -> Any:
        if calls:
            return real(self, *args, **kwargs)
        calls.append(args)
        real(self, *args, **kwargs)
        raise ConnectionError("killed after the alias moved")

    monkeypatch.setattr(mlflow.MlflowClient, method, once)


def test_a_second_rollback_goes_further_back_then_says_there_is_nothing(
    name: str, logged_model: Callable[[], str]
) -> None:
    v1, v2, v3 = versions(name, logged_model, 3)
    for v in (v1, v2, v3):
        promote(name, v, "release")

    assert rollback(name, "bad v3") == v2
    assert rollback(name, "bad v2 too") == v1
    with pytest.raises(RegistryError, match="nothing earlier"):
        rollback(name, "again")
    assert champion_version(name) == v1


def test_rollback_never_brings_back_the_version_it_left(
    name: str, logged_model: Callable[[], str]
) -> None:
    v1, v2 = versions(name, logged_model, 2)
    promote(name, v1, "first")
    promote(name, v2, "second")

    assert rollback(name, "bad v2") == v1
    with pytest.raises(RegistryError, match="nothing earlier"):
        rollback(name, "again")
    assert champion_version(name) == v1
    # Promoting v2 again puts it back on the stack.
    promote(name, v2, "fixed")
    assert rollback(name, "no, still bad") == v1


def test_promoting_the_champion_records_nothing(name: str, logged_model: Callable[[], str]) -> None:
    v1, v2 = versions(name, logged_model, 2)
    promote(name, v1, "first")
    moved = promote(name, v2, "second")

    again = promote(name, v2, "again")

    entries = registry.history(name)
    assert [(e["version"], e["previous"]) for e in entries] == [(v1, None), (v2, v1)]
    assert rollback(name, "bad v2") == v1
    assert (moved, again) == (True, False)


def test_a_crash_between_alias_and_history_is_finished_by_the_retry(
    name: str,
    logged_model: Callable[[], str],
    client: mlflow.MlflowClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    v1, v2 = versions(name, logged_model, 2)
    promote(name, v1, "first")
    crash_after("set_registered_model_alias", monkeypatch)
    with pytest.raises(ConnectionError):
        promote(name, v2, "second")
    assert champion_version(name) == v2

    retried = promote(name, v2, "the task's retry")

    last = registry.history(name)[-1]
    assert (last["version"], last["previous"], last.get("state")) == (v2, v1, "done")
    assert client.get_model_version(name, v2).tags["mmops.champion.previous"] == v1
    assert rollback(name, "bad v2") == v1
    assert retried is False


def test_a_crash_before_the_alias_moved_leaves_no_history(
    name: str, logged_model: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    v1, v2, v3 = versions(name, logged_model, 3)
    promote(name, v1, "first")

    def down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("tracking server went away")

    with monkeypatch.context() as patch:
        patch.setattr(mlflow.MlflowClient, "set_registered_model_alias", down)
        with pytest.raises(ConnectionError):
            promote(name, v2, "second")
    assert champion_version(name) == v1

    promote(name, v3, "third")

    assert [e["version"] for e in registry.history(name)] == [v1, v3]
    assert rollback(name, "bad v3") == v1


def test_register_twice_from_one_model_makes_one_version(
    name: str, logged_model: Callable[[], str], client: mlflow.MlflowClient
) -> None:
    uri = logged_model()
    first = register(uri, name, {"train.run_id": "r1"})

    assert register(uri, name, {"train.run_id": "r1"}) == first
    assert register(logged_model(), name, {}) != first
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    assert client.get_model_version_by_alias(name, "challenger").version != first


def test_champion_is_none_only_when_model_or_alias_is_missing(
    name: str, logged_model: Callable[[], str]
) -> None:
    assert champion_version(name) is None
    (v1,) = versions(name, logged_model, 1)
    assert champion_version(name) is None
    promote(name, v1, "first")
    assert champion_version(name) == v1


def hold_lease(client: mlflow.MlflowClient, name: str, owner: str, expires_in_s: float) -> None:
    held = {"owner": owner, "expires": time.time() + expires_in_s}
    client.set_registered_model_tag(name, lease.LEASE_TAG, json.dumps(held))


def test_a_lease_held_by_another_host_blocks_promotion(
    name: str,
    logged_model: Callable[[], str],
    client: mlflow.MlflowClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (v1,) = versions(name, logged_model, 1)
    hold_lease(client, name, "other-host:1:abc", 600)
    monkeypatch.setattr(lease, "WAIT_S", 0.2)

    with pytest.raises(RegistryError, match="other-host"):
        promote(name, v1, "first")
    assert champion_version(name) is None


def test_an_expired_lease_is_taken_over_and_released(
    name: str, logged_model: Callable[[], str], client: mlflow.MlflowClient
) -> None:
    (v1,) = versions(name, logged_model, 1)
    hold_lease(client, name, "dead-host:1:abc", -1)

    promote(name, v1, "first")

    assert champion_version(name) == v1
    assert lease.LEASE_TAG not in client.get_registered_model(name).tags


def test_two_claimers_of_the_lease_take_turns(
    name: str, logged_model: Callable[[], str], store: Path
) -> None:
    versions(name, logged_model, 1)
    inside: list[int] = []
    overlaps: list[int] = []
    done: list[int] = []

    def claim() -> None:
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
        with lease.promotion_lease(client, name):
            inside.append(1)
            if len(inside) > 1:
                overlaps.append(1)
            time.sleep(0.2)
            inside.pop()
        done.append(1)

    threads = [threading.Thread(target=claim) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert len(done) == 2 and not overlaps


def test_two_first_claims_written_at_the_same_moment_take_turns(
    name: str, logged_model: Callable[[], str], store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both claimers find no lease tag, then insert it at once: the database store takes the
    first insert and fails the second on its unique key. The loser waits its turn instead of
    crashing (seen in CI on a loaded machine; here the two inserts are lined up on purpose)."""
    from sqlalchemy.orm import Session

    versions(name, logged_model, 1)
    together = threading.Barrier(2, timeout=30)
    merge = Session.merge
    waited: set[threading.Thread] = set()

    def merge_together(self: Session, instance: Any, *args: Any, **kwargs: Any) -> Any:
        merged = merge(self, instance, *args, **kwargs)  # looked up: not there yet
        me = threading.current_thread()
        lease_tag = getattr(instance, "key", None) == lease.LEASE_TAG
        if lease_tag and me in claimers and me not in waited:
            waited.add(me)
            together.wait()  # both inserts pending before either commits
        return merged

    monkeypatch.setattr(Session, "merge", merge_together)
    monkeypatch.setattr(lease, "POLL_S", 0.5)
    inside: list[int] = []
    overlaps: list[int] = []
    done: list[int] = []
    errors: list[BaseException] = []

    def claim() -> None:
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
        try:
            with lease.promotion_lease(client, name):
                inside.append(1)
                overlaps.extend([1] if len(inside) > 1 else [])
                time.sleep(0.2)
                inside.pop()
            done.append(1)
        except BaseException as error:
            errors.append(error)

    claimers = [threading.Thread(target=claim) for _ in range(2)]
    for t in claimers:
        t.start()
    for t in claimers:
        t.join(timeout=60)

    assert waited == set(claimers)  # both writes really were lined up
    assert not errors, errors
    assert len(done) == 2 and not overlaps
