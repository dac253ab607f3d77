"""The promotion lease's decisions: whose holder is gone, old leases, the heartbeat's care."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.exceptions import MlflowException

from mmops.tracking import lease
from mmops.tracking.lease import Lease, free_to_claim, holder_gone

HOST = "here"
NOW = 1_000_000.0


class FakeClient:
    """The three registry calls the lease makes, on one model's tags in memory."""

    def __init__(self) -> None:
        self.tags: dict[str, str] = {}
        self.lock = threading.Lock()
        self.fail_writes = 0

    def get_registered_model(self, name: str) -> Any:
        with self.lock:
            return SimpleNamespace(tags=dict(self.tags))

    def set_registered_model_tag(self, name: str, key: str, value: str) -> None:
        with self.lock:
            if self.fail_writes:
                self.fail_writes -= 1
                raise MlflowException("registry briefly unavailable")
            self.tags[key] = value

    def delete_registered_model_tag(self, name: str, key: str) -> None:
        with self.lock:
            del self.tags[key]


def held_by(pid: int | None = 42, started: int | None = 7, host: str = HOST, **kw: Any) -> Lease:
    owner = f"{host}:{pid}:x"
    return Lease(owner=owner, expires=NOW + 30, host=host, pid=pid, started=started, **kw)


def probes(alive: bool, started: int | None) -> dict[str, Any]:
    return {"alive": lambda pid: alive, "start_time": lambda pid: started}


def test_a_live_holder_on_this_host_keeps_its_lease() -> None:
    assert holder_gone(held_by(), HOST, None, **probes(True, 7)) is None
    assert free_to_claim(held_by(), NOW, HOST, None, **probes(True, 7)) == (False, None)


def test_a_dead_holder_on_this_host_is_gone() -> None:
    why = holder_gone(held_by(), HOST, None, **probes(False, None))
    assert why is not None and "42" in why and "not running" in why
    assert free_to_claim(held_by(), NOW, HOST, None, **probes(False, None))[0]


def test_a_reused_pid_is_a_gone_holder() -> None:
    why = holder_gone(held_by(started=7), HOST, None, **probes(True, 9))
    assert why is not None and "another process" in why


def test_without_proc_a_live_pid_is_taken_as_the_holder() -> None:
    # No start time to compare, on either side: only a dead pid is certain.
    assert holder_gone(held_by(started=None), HOST, None, **probes(True, 9)) is None
    assert holder_gone(held_by(started=7), HOST, None, **probes(True, None)) is None


def test_a_holder_on_another_host_or_pid_namespace_is_judged_by_expiry_alone() -> None:
    dead = probes(False, None)
    assert holder_gone(held_by(host="far"), HOST, None, **dead) is None
    other_ns = held_by(pidns="pid:[1]")
    assert holder_gone(other_ns, HOST, "pid:[2]", **dead) is None
    assert holder_gone(other_ns, HOST, "pid:[1]", **dead) is not None
    expired = Lease(owner="far:1:x", expires=NOW - 5, host="far", pid=1)
    free, why = free_to_claim(expired, NOW, HOST, None, **probes(True, None))
    assert free and why is not None and "expired 5 s ago" in why


def test_an_old_format_lease_is_held_until_it_expires() -> None:
    old = Lease.parse(json.dumps({"owner": "old-host:1:abc", "expires": NOW + 10}))
    assert old == Lease(owner="old-host:1:abc", expires=NOW + 10)
    assert old.holder == "old-host:1:abc"
    # No host and pid of its own: never judged gone, however the probes answer.
    assert free_to_claim(old, NOW, "old-host", None, **probes(False, None)) == (False, None)
    assert free_to_claim(old, NOW + 11, "old-host", None, **probes(True, 7))[0]


def test_a_new_lease_round_trips_and_a_broken_tag_is_no_lease() -> None:
    new = held_by(pidns="pid:[1]", claimed=NOW - 3)
    assert Lease.parse(new.to_json()) == new
    assert new.holder == f"{HOST} pid 42"
    assert "claimed 3 s ago, expires in 30 s" in new.describe(NOW)
    for broken in (None, "", "{", "[1]", '{"expires": 1}', '{"owner": "a", "pid": "x"}'):
        assert Lease.parse(broken) is None


def test_the_probes_tell_this_process_from_a_dead_one() -> None:
    me = os.getpid()
    assert lease.pid_alive(me)
    started = lease.process_start_time(me)
    if started is None:
        pytest.skip("no /proc here")
    assert started == lease.process_start_time(me)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not lease.pid_alive(child.pid)
    assert lease.process_start_time(child.pid) is None


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease, "SETTLE_S", 0.01)
    monkeypatch.setattr(lease, "POLL_S", 0.01)
    monkeypatch.setattr(lease, "TTL_S", 0.4)
    monkeypatch.setattr(lease, "RENEW_S", 0.05)


def test_the_heartbeat_never_overwrites_a_lease_that_is_no_longer_ours(
    quick: None, caplog: pytest.LogCaptureFixture
) -> None:
    client = FakeClient()
    other = Lease(owner="far:1:x", expires=time.time() + 60, host="far", pid=1)
    with lease.promotion_lease(client, "m"):
        client.tags[lease.LEASE_TAG] = other.to_json()  # taken from us while we stalled
        time.sleep(0.3)
    assert Lease.parse(client.tags[lease.LEASE_TAG]) == other  # neither renewed nor deleted
    assert "no longer ours" in caplog.text


def test_the_heartbeat_renews_through_a_transient_registry_error(
    quick: None, caplog: pytest.LogCaptureFixture
) -> None:
    client = FakeClient()
    with lease.promotion_lease(client, "m"):
        first = Lease.parse(client.tags[lease.LEASE_TAG])
        client.fail_writes = 2
        time.sleep(0.5)  # past the TTL: only renewals keep it
        now = Lease.parse(client.tags[lease.LEASE_TAG])
        assert first is not None and now is not None and now.owner == first.owner
        assert now.expires > time.time()
        assert now.claimed == first.claimed
    assert lease.LEASE_TAG not in client.tags
    assert "could not renew" in caplog.text


def test_the_heartbeat_stops_when_the_block_exits(quick: None) -> None:
    client = FakeClient()
    with lease.promotion_lease(client, "m"):
        pass
    time.sleep(0.2)
    assert lease.LEASE_TAG not in client.tags
    assert not [t for t in threading.enumerate() if t.name == "lease-m"]


def test_a_waiting_claimer_names_the_holder_and_how_to_free_it(
    quick: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client = FakeClient()
    other = Lease(owner="far:77:x", expires=time.time() + 60, host="far", pid=77)
    client.tags[lease.LEASE_TAG] = other.to_json()
    monkeypatch.setattr(lease, "WAIT_S", 0.05)
    caplog.set_level(logging.INFO, logger=lease.__name__)
    with (
        pytest.raises(lease.LeaseTimeout, match="far pid 77") as raised,
        lease.promotion_lease(client, "m"),
    ):
        pass
    assert "`mmops lease release m --force`" in str(raised.value)
    waiting = [r.message for r in caplog.records if "waiting" in r.message]
    assert waiting and "far pid 77" in waiting[0] and "mmops lease release m --force" in waiting[0]
