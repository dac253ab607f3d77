"""A promotion lease kept on the registered model itself, so hosts sharing a registry take turns.

MLflow has no compare-and-set, so the lease is claimed by writing the tag, waiting `SETTLE_S`
and reading it back: of claims written within that window the last one wins and only its owner
goes on. Two first writes at the same moment meet the database's unique key: the loser's write
fails and it waits like any other. A claimer paused for longer than the window between its read
and its write can still overlap another; a holder that dies leaves the lease until `TTL_S` runs
out.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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
TTL_S = 3600.0  # the gate task's timeout: a holder past it has been stopped
WAIT_S = 3600.0
SETTLE_S = 2.0
POLL_S = 5.0
# What a write of the tag gets when another claimer's write of it landed first.
CONFLICTS = (ErrorCode.Name(BAD_REQUEST), ErrorCode.Name(RESOURCE_ALREADY_EXISTS))


class LeaseTimeout(RuntimeError):
    """Another holder kept the promotion lease for longer than we wait."""


@contextmanager
def promotion_lease(client: Any, name: str) -> Iterator[None]:
    """Hold the lease on `name` while the block runs; no lease when the model does not exist."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    if not _claim(client, name, owner):
        yield  # no registered model yet: nothing to promote, and nowhere to keep a lease
        return
    try:
        yield
    finally:
        held = _read(client, name)
        if held is not None and held.get("owner") == owner:
            client.delete_registered_model_tag(name, LEASE_TAG)


def _claim(client: Any, name: str, owner: str) -> bool:
    """Wait for the lease and take it; False when there is no registered model."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            held = _read(client, name)
        except LookupError:
            return False
        if (held is None or held.get("expires", 0) < time.time()) and _write(client, name, owner):
            time.sleep(SETTLE_S)
            held = _read(client, name)
            if held is not None and held.get("owner") == owner:
                return True
        if time.monotonic() > deadline:
            raise LeaseTimeout(
                f"{name}: {held and held.get('owner')} holds the promotion lease (tag "
                f"{LEASE_TAG}); deleting the tag frees it if its holder is gone"
            )
        log.info("%s: waiting for the promotion lease held by %s", name, held and held["owner"])
        time.sleep(POLL_S)


def _write(client: Any, name: str, owner: str) -> bool:
    """Write our lease; False when a claimer writing at the same moment won (a database store
    inserts a new tag once: the second insert fails its unique key)."""
    lease = {"owner": owner, "expires": time.time() + TTL_S}
    try:
        client.set_registered_model_tag(name, LEASE_TAG, json.dumps(lease))
    except MlflowException as exc:
        if exc.error_code not in CONFLICTS:
            raise
        log.debug("%s: another claimer wrote the lease first: %s", name, exc)
        return False
    return True


def _read(client: Any, name: str) -> dict[str, Any] | None:
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise LookupError(name) from exc
        raise
    text = tags.get(LEASE_TAG)
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None  # a broken tag is no lease
