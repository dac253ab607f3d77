"""Retrains that start themselves: a drift alarm runs the retrain flow's deployment.

`drift_trigger` gives `mmops serve` the callback its drift monitor calls on each alarm. The call
only starts a thread: the trigger asks the Prefect API (the one source of truth for every
consumer replica) whether a run of the deployment is in flight, or a drift-started one began
within `trigger.cooldown_s`, and if neither, starts one with `run_deployment`: parameters
`trigger="drift"` and the alarm as `reason`, tagged `trigger.tag`. Two replicas alarming at once
may both pass the check; the flow's promotion slot still lets one gate at a time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from mmops.config import TriggerConfig
from mmops.monitoring.monitor import DriftEvent

log = logging.getLogger(__name__)

IN_FLIGHT = ("PENDING", "RUNNING", "PAUSED", "CANCELLING")


class DriftTrigger:
    """Debounced starts of the retrain deployment; call it with each drift alarm."""

    def __init__(self, cfg: TriggerConfig) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._last_start = 0.0
        self.started: list[str] = []  # flow run ids started by this process
        self.threads: list[threading.Thread] = []

    def __call__(self, alarm: DriftEvent) -> None:
        thread = threading.Thread(
            target=self._start, args=(alarm,), name="mmops-trigger", daemon=True
        )
        self.threads = [t for t in self.threads if t.is_alive()] + [thread]  # alarms are rare
        thread.start()

    def _start(self, alarm: DriftEvent) -> None:
        with self._lock:  # one check-and-start at a time in this process
            if time.monotonic() - self._last_start < self.cfg.cooldown_s and self.started:
                return
            try:
                busy = self._busy()
                if busy:
                    log.info("drift alarm: no retrain started (%s)", busy)
                    return
                run = self._run(alarm)
            except Exception as error:  # the Prefect API away: the next alarm tries again
                log.warning(
                    "drift alarm: could not start a retrain: %s: %s", type(error).__name__, error
                )
                return
            self._last_start = time.monotonic()
            self.started.append(str(run.id))
            log.warning(
                "drift alarm on %s: started retrain flow run %s (%s)",
                alarm.modality,
                run.name,
                self.cfg.deployment,
            )

    def _busy(self) -> str | None:
        """Why no run may start now: one in flight, or a drift-started one in the cool-down."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterId,
            FlowRunFilter,
            FlowRunFilterStartTime,
            FlowRunFilterState,
            FlowRunFilterStateType,
            FlowRunFilterTags,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.client.schemas.sorting import FlowRunSort

        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(self.cfg.deployment)
            of_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
            states = [StateType(s) for s in IN_FLIGHT]
            running = client.read_flow_runs(
                deployment_filter=of_deployment,
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states))
                ),
                limit=1,
                sort=FlowRunSort.ID_DESC,  # the sync client sends no default: refused
            )
            if running:
                return f"run {running[0].name} is {running[0].state_type.value.lower()}"
            since = datetime.now(UTC) - timedelta(seconds=self.cfg.cooldown_s)
            recent = client.read_flow_runs(
                deployment_filter=of_deployment,
                flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=[self.cfg.tag]),
                    start_time=FlowRunFilterStartTime(after_=since),
                ),
                limit=1,
                sort=FlowRunSort.ID_DESC,
            )
            if recent:
                return f"run {recent[0].name} started within trigger.cooldown_s"
            pending = client.read_flow_runs(  # created, not started yet (start_time unset)
                deployment_filter=of_deployment,
                flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=[self.cfg.tag]),
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])
                    ),
                ),
                limit=1,
                sort=FlowRunSort.ID_DESC,
            )
            return f"run {pending[0].name} waits to start" if pending else None

    def _run(self, alarm: DriftEvent) -> Any:
        from prefect.deployments import run_deployment

        return run_deployment(
            self.cfg.deployment,
            parameters={"trigger": "drift", "reason": json.dumps(alarm.to_dict())},
            tags=[self.cfg.tag],
            timeout=0,  # start it, do not wait for it
        )


def drift_trigger(cfg: TriggerConfig) -> Callable[[DriftEvent], None] | None:
    """The serve command's alarm callback, or None when trigger.enabled is off."""
    return DriftTrigger(cfg) if cfg.enabled else None
