"""Runs left RUNNING by a process that died, told apart by the host and pid each run is tagged
with at its start, and closed as FAILED with a tag saying why (`mmops doctor`, the retrain flow)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mmops.config import Params
from mmops.environment import mlflow_client
from mmops.tracking.deadlines import apply_deadlines

log = logging.getLogger(__name__)

HOST_TAG, PID_TAG, STARTED_TAG = "mmops.host", "mmops.pid", "mmops.pid_started"
ORPHAN_TAG = "mmops.orphaned"  # why the run was marked FAILED
# MLflow tags every run it creates with the JSON object in this variable (its
# SystemEnvironmentContext), which reaches every start_run without touching each caller.
RUN_CONTEXT = "MLFLOW_RUN_CONTEXT"


def process_tags() -> dict[str, str]:
    """This process: its host, pid and the pid's start time (a reused pid is another process)."""
    import psutil

    started = psutil.Process().create_time()
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
        STARTED_TAG: f"{started:.2f}",
    }


def tag_runs_with_process() -> None:
    """Have MLflow tag each run this process creates with `process_tags()`."""
    tags = json.loads(os.environ.get(RUN_CONTEXT) or "{}")
    os.environ[RUN_CONTEXT] = json.dumps({**tags, **process_tags()})


def process_alive(pid: int, started: float | None) -> bool:
    """Whether process `pid` of this host runs and, given its start time, is the same process."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(process.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's: it exists
        return True


@dataclass(frozen=True)
class RunActivity:
    """What tells whether a RUNNING run still has a process behind it."""

    run_id: str
    name: str
    host: str | None
    pid: int | None
    pid_started: float | None
    # Ended once and opened again (evaluate and export reopen the training run): its host and pid
    # are those of the process that created it, not of the one holding it now.
    reopened: bool
    last_active_ms: int

    @classmethod
    def of(cls, run: Any) -> RunActivity:
        tags, info = run.data.tags, run.info
        return cls(
            run_id=info.run_id,
            name=info.run_name or "",
            host=tags.get(HOST_TAG),
            pid=_number(int, tags.get(PID_TAG)),
            pid_started=_number(float, tags.get(STARTED_TAG)),
            reopened=info.end_time is not None,
            last_active_ms=max(info.start_time or 0, info.end_time or 0),
        )

    def judged_by_pid(self, host: str) -> bool:
        return self.host == host and self.pid is not None and not self.reopened


@dataclass(frozen=True)
class Orphan:
    run_id: str
    name: str
    reason: str


def orphan_reason(
    run: RunActivity,
    host: str,
    now_ms: int,
    after_s: int,
    alive: Callable[[int, float | None], bool] = process_alive,
) -> str | None:
    """Why `run` has no live process behind it, or None while it may have one."""
    if run.judged_by_pid(host):
        return None if alive(run.pid, run.pid_started) else f"process {run.pid} on {host} is gone"  # type: ignore[arg-type]
    idle_s = (now_ms - run.last_active_ms) / 1000
    if idle_s <= after_s:
        return None
    source = f"on {run.host}" if run.host else "with no host recorded"
    limit = f"tracking.orphan_after_s={after_s}"
    return f"no update for {idle_s / 3600:.1f} h from a run {source} ({limit})"


def find_orphans(client: Any, experiment: str, after_s: int) -> list[Orphan]:
    """The RUNNING runs of `experiment` whose process is gone."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    host, now_ms = socket.gethostname(), int(time.time() * 1000)
    orphans = []
    for run in _running(client, found.experiment_id):
        activity = RunActivity.of(run)
        reason = orphan_reason(activity, host, now_ms, after_s)
        if reason and not activity.judged_by_pid(host):
            # Idle by its own dates: look at what it logged, and at its nested runs, before judging.
            last = _last_logged_ms(client, run, found.experiment_id, now_ms - after_s * 1000)
            activity = dataclasses.replace(
                activity, last_active_ms=max(last, activity.last_active_ms)
            )
            reason = orphan_reason(activity, host, now_ms, after_s)
        if reason:
            orphans.append(Orphan(activity.run_id, activity.name, reason))
    return orphans


def close_orphans(client: Any, orphans: list[Orphan]) -> None:
    for orphan in orphans:
        client.set_tag(orphan.run_id, ORPHAN_TAG, orphan.reason)
        client.set_terminated(orphan.run_id, status="FAILED")
        log.warning("run %s (%s) marked FAILED: %s", orphan.run_id, orphan.name, orphan.reason)


def close_orphaned_runs(params: Params, dry_run: bool = False) -> list[Orphan]:
    """Mark FAILED the RUNNING runs whose process is gone (`dry_run`: only list them)."""
    apply_deadlines(params.tracking)
    client = mlflow_client()
    cfg = params.tracking
    orphans = find_orphans(client, cfg.experiment, cfg.orphan_after_s)
    if not dry_run:
        close_orphans(client, orphans)
    return orphans


def _running(client: Any, experiment_id: str) -> Iterator[Any]:
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], "attributes.status = 'RUNNING'", max_results=1000, page_token=token
        )
        yield from page
        token = page.token
        if not token:
            return


def _last_logged_ms(client: Any, run: Any, experiment_id: str, recent_ms: int) -> int:
    """The latest time `run` logged a metric or one of its nested runs started or ended; stops
    looking once it finds one after `recent_ms`."""
    latest = 0
    for key in run.data.metrics:
        history = client.get_metric_history(run.info.run_id, key)
        latest = max([latest, *(m.timestamp for m in history)])
        if latest > recent_ms:
            return latest
    children = client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'", max_results=1000
    )
    for child in children:
        latest = max(latest, child.info.start_time or 0, child.info.end_time or 0)
    return latest


def _number(kind: type, text: str | None) -> Any:
    try:
        return kind(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
