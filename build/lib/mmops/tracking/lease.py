"""A promotion lease kept on the registered model itself, so hosts sharing a registry take turns.

MLflow has no compare-and-set, so the lease is claimed by writing the tag, waiting `SETTLE_S`
and reading it back: of claims written within that window the last one wins and only its owner
goes on. Two first writes at the same moment meet the database's unique key: the loser's write
fails and it waits like any other. A claimer paused for longer than the window between its read
and its write can still overlap another.

A lease names its holder (host, pid, the process's start time), so a claimer on the same host
takes over at once from a holder that is gone, and a heartbeat renews its expiry while the
holder works, so a holder on another host that dies leaves the lease for `TTL_S` at most.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    BAD_REQUEST,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)

log = logging.getLogger(__name__)

LEASE_TAG = "mmops.promotion_lease"
TTL_S = 60.0  # a lease not renewed for this long has lost its holder
RENEW_S = 15.0  # heartbeat period; at most TTL_S / 4, so three renewals in a row may fail
WAIT_S = 3600.0  # the gate task's timeout: a live holder past it has been stopped
SETTLE_S = 2.0
POLL_S = 5.0
WAIT_LOG_S = 60.0  # how often a claimer says it still waits for the same holder
# What a write of the tag gets when another claimer's write of it landed first.
CONFLICTS = (ErrorCode.Name(BAD_REQUEST), ErrorCode.Name(RESOURCE_ALREADY_EXISTS))


class LeaseTimeout(RuntimeError):
    """Another holder kept the promotion lease for longer than we wait."""


@dataclass(frozen=True)
class Lease:
    """A lease as its tag holds it; a lease of an older mmops has only `owner` and `expires`."""

    owner: str
    expires: float
    host: str | None = None
    pid: int | None = None
    started: int | None = None  # the holder's start, clock ticks after boot
    pidns: str | None = None  # the holder's pid namespace: containers on one host differ
    claimed: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> Lease | None:
        """The lease in a tag's value; None for no tag or a broken one (a broken tag is no
        lease)."""
        try:
            record = json.loads(text) if text else None
            if not isinstance(record, dict):
                return None
            return cls(
                owner=str(record["owner"]),
                expires=float(record.get("expires", 0)),
                host=_optional(record, "host", str),
                pid=_optional(record, "pid", int),
                started=_optional(record, "started", int),
                pidns=_optional(record, "pidns", str),
                claimed=_optional(record, "claimed", float),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @property
    def holder(self) -> str:
        """Who holds it, for a person: host and pid, or the owner string of an old lease."""
        return f"{self.host} pid {self.pid}" if self.host else self.owner

    def describe(self, now: float) -> str:
        """The holder, when it claimed the lease and when the lease runs out."""
        claimed = f", claimed {now - self.claimed:.0f} s ago" if self.claimed else ""
        left = self.expires - now
        ends = f"expires in {left:.0f} s" if left >= 0 else f"expired {-left:.0f} s ago"
        return f"{self.holder}{claimed}, {ends}"


def _optional(record: dict[str, Any], key: str, kind: type) -> Any:
    value = record.get(key)
    return None if value is None else kind(value)


def process_start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (field 22 of /proc/<pid>/stat);
    None where there is no /proc or no such process."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (in our pid namespace); a zombie does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    fields = _stat_fields(pid)
    return not (fields and fields[0] in ("Z", "X"))


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3 onwards of /proc/<pid>/stat (field 2, the command, may hold spaces)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def holder_gone(
    lease: Lease,
    host: str,
    pidns: str | None,
    alive: Callable[[int], bool] = pid_alive,
    start_time: Callable[[int], int | None] = process_start_time,
) -> str | None:
    """Why the holder of `lease` is known to be gone, judged from `host`; None when it may
    still be working (another host or pid namespace, or an old lease without a pid)."""
    if lease.host != host or lease.pid is None:
        return None
    if lease.pidns is not None and pidns is not None and lease.pidns != pidns:
        return None  # another container on this host: its pids are not ours to see
    if not alive(lease.pid):
        return f"process {lease.pid} is not running"
    if lease.started is not None:
        started = start_time(lease.pid)
        if started is not None and started != lease.started:
            return f"pid {lease.pid} is now another process (started at tick {started})"
    return None


def free_to_claim(
    held: Lease | None,
    now: float,
    host: str,
    pidns: str | None,
    alive: Callable[[int], bool] = pid_alive,
    start_time: Callable[[int], int | None] = process_start_time,
) -> tuple[bool, str | None]:
    """Whether a claimer may write its lease over `held`, and the reason to log a takeover."""
    if held is None:
        return True, None
    if held.expires < now:
        return True, f"its lease expired {now - held.expires:.0f} s ago"
    gone = holder_gone(held, host, pidns, alive, start_time)
    return gone is not None, gone


def release_hint(name: str) -> str:
    """How a person frees the lease on `name` of a holder that is gone."""
    return f"if that holder is gone, `mmops lease release {name} --force` frees it"


@contextmanager
def promotion_lease(client: Any, name: str) -> Iterator[None]:
    """Hold the lease on `name` while the block runs; no lease when the model does not exist."""
    pid = os.getpid()
    mine = Lease(
        owner=f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}",
        expires=0.0,
        host=socket.gethostname(),
        pid=pid,
        started=process_start_time(pid),
        pidns=_pid_namespace(),
    )
    if not _claim(client, name, mine):
        yield  # no registered model yet: nothing to promote, and nowhere to keep a lease
        return
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(client, name, mine, stop), name=f"lease-{name}", daemon=True
    )
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()  # before the delete: a renewal landing after it would bring the lease back
        held = _read(client, name)
        if held is not None and held.owner == mine.owner:
            client.delete_registered_model_tag(name, LEASE_TAG)


def _claim(client: Any, name: str, mine: Lease) -> bool:
    """Wait for the lease and take it; False when there is no registered model."""
    deadline = time.monotonic() + WAIT_S
    said: tuple[str | None, float] = (None, 0.0)  # whom we last said we wait for, and when
    while True:
        try:
            held = _read(client, name)
        except LookupError:
            return False
        free, why = free_to_claim(held, time.time(), mine.host or "", mine.pidns)
        if free:
            if held is not None:
                log.warning("%s: taking over the promotion lease of %s: %s", name, held.holder, why)
            if _write(client, name, mine):
                time.sleep(SETTLE_S)
                held = _read(client, name)
                if held is not None and held.owner == mine.owner:
                    return True
        holder = held.holder if held else None
        if time.monotonic() > deadline:
            raise LeaseTimeout(
                f"{name}: waited {WAIT_S:.0f} s for the promotion lease (tag {LEASE_TAG}), "
                f"still held by {holder}; {release_hint(name)}"
            )
        if holder is not None and (holder != said[0] or time.monotonic() - said[1] > WAIT_LOG_S):
            log.info(
                "%s: waiting for the promotion lease held by %s; %s",
                name,
                holder,
                release_hint(name),
            )
            said = (holder, time.monotonic())
        time.sleep(POLL_S)


def _heartbeat(client: Any, name: str, mine: Lease, stop: threading.Event) -> None:
    """Renew our lease's expiry until `stop`; stop renewing once the lease is not ours.

    Between the read and the write a claimer may write its own lease; its read-back after
    `SETTLE_S` then finds ours and it waits, as with two claims at once.
    """
    while not stop.wait(min(RENEW_S, TTL_S / 4)):
        try:
            held = _read(client, name)
            if held is None or held.owner != mine.owner:
                log.error(
                    "%s: the promotion lease is no longer ours (%s holds it): this promotion "
                    "is no longer protected from another",
                    name,
                    held.holder if held else "nobody",
                )
                return
            renewed = replace(held, expires=time.time() + TTL_S)
            client.set_registered_model_tag(name, LEASE_TAG, renewed.to_json())
        except LookupError:
            return  # the model is gone, and the lease with it
        except Exception as exc:  # a transient registry error must not end the heartbeat
            log.warning("%s: could not renew the promotion lease, will retry: %s", name, exc)


def _write(client: Any, name: str, mine: Lease) -> bool:
    """Write our lease; False when a claimer writing at the same moment won (a database store
    inserts a new tag once: the second insert fails its unique key)."""
    now = time.time()
    lease = replace(mine, claimed=now, expires=now + TTL_S)
    try:
        client.set_registered_model_tag(name, LEASE_TAG, lease.to_json())
    except MlflowException as exc:
        if exc.error_code not in CONFLICTS:
            raise
        log.debug("%s: another claimer wrote the lease first: %s", name, exc)
        return False
    return True


def read_lease(client: Any, name: str) -> dict[str, Any] | None:
    """The lease on `name` as its tag holds it, or None; LookupError when there is no model."""
    held = _read(client, name)
    return asdict(held) if held else None


def release_lease(client: Any, name: str) -> dict[str, Any] | None:
    """Delete the lease on `name`, whoever holds it; the lease it was, or None when there was
    none. LookupError when there is no such model."""
    tags = _tags(client, name)
    if LEASE_TAG not in tags:
        return None
    client.delete_registered_model_tag(name, LEASE_TAG)
    held = Lease.parse(tags[LEASE_TAG])
    return asdict(held or Lease(owner=f"a broken tag {tags[LEASE_TAG][:80]!r}", expires=0.0))


def _read(client: Any, name: str) -> Lease | None:
    return Lease.parse(_tags(client, name).get(LEASE_TAG))


def _tags(client: Any, name: str) -> dict[str, str]:
    try:
        return client.get_registered_model(name).tags
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise LookupError(name) from exc
        raise
