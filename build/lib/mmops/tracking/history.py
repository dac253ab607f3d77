"""The champion's history: a write-ahead log of alias moves, and the stack rollback walks.

MLflow keeps no history of alias moves and has no transaction across two writes, so each move is
logged before the alias moves (state `pending`) and marked `done` after; the next registry call
finishes a pending entry whose move happened and drops one whose move did not.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

HISTORY_TAG = "mmops.champion_history"
KEEP = 30  # entries in the registered-model tag; version tags keep the rest
VALUE_LIMIT = 4900
PENDING = "pending"
DONE = "done"


def read(client: Any, name: str) -> list[dict[str, Any]]:
    """Alias moves, oldest first: version, previous, action, at, by, reason, state."""
    return json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))


def entry(version: str, previous: str | None, action: str, who: str, reason: str) -> dict[str, Any]:
    """A new, pending log entry for moving the champion from `previous` to `version`."""
    return {
        "version": version,
        "previous": previous,
        "action": action,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "by": who,
        "reason": reason[:500],
        "state": PENDING,
    }


def stack(entries: list[dict[str, Any]], current: str | None) -> list[str]:
    """The champions to roll back through, current last: distinct versions in promotion order.

    A promotion moves its version to the top; a rollback takes the version it left off the stack,
    so no later rollback brings it back (only a new promotion does). A champion set outside mmops
    counts as promoted last.
    """
    versions: list[str] = []
    for e in entries:
        if e.get("state", DONE) != DONE:
            continue
        gone = {str(e["version"])}
        if e.get("action") == "rollback" and e.get("previous"):
            gone.add(str(e["previous"]))
        versions = [v for v in versions if v not in gone] + [str(e["version"])]
    if current is not None and (not versions or versions[-1] != current):
        versions = [v for v in versions if v != current] + [current]
    return versions


def begin(client: Any, name: str, new: dict[str, Any]) -> None:
    """Write `new` to the log before its alias move (the write-ahead half)."""
    _write(client, name, [*read(client, name), new])


def commit(client: Any, name: str, done: dict[str, Any]) -> None:
    """Record a move that happened: the version's tags, and its log entry marked done."""
    for key in ("at", "by", "reason", "action", "previous"):
        value = str(done[key])
        client.set_model_version_tag(name, done["version"], f"mmops.champion.{key}", value)
    entries = read(client, name)
    for e in reversed(entries):
        if e.get("state") == PENDING and e["version"] == done["version"]:
            e["state"] = DONE
            break
    _write(client, name, entries)
    log.info(
        "%s: champion v%s -> v%s (%s: %s)",
        name,
        done["previous"],
        done["version"],
        done["action"],
        done["reason"],
    )


def recover(client: Any, name: str, current: str | None) -> None:
    """Finish a pending entry whose alias move happened; drop one whose move did not."""
    entries = read(client, name)
    if not entries or entries[-1].get("state") != PENDING:
        return
    last = entries[-1]
    if current is not None and current == str(last["version"]):
        log.warning("%s: finishing the log of an interrupted move to v%s", name, current)
        commit(client, name, last)
    else:
        log.warning("%s: dropping an interrupted move to v%s", name, last["version"])
        _write(client, name, entries[:-1])


def _write(client: Any, name: str, entries: list[dict[str, Any]]) -> None:
    entries = entries[-KEEP:]
    text = json.dumps(entries)
    while len(text) > VALUE_LIMIT and len(entries) > 1:  # MLflow's VARCHAR(5000) tag values
        entries = entries[1:]
        text = json.dumps(entries)
    client.set_registered_model_tag(name, HISTORY_TAG, text)
