"""Drift monitoring beside the serving loop: a thread that never holds up a prediction.

The serving thread hands each acknowledged batch's `Observed` to `DriftWatch.submit`, which only
queues it (a full queue skips the batch and counts it). The watch's thread calibrates the served
version's detectors (seconds, once per version), updates them, sets the drift gauges, and sends
each alarm as JSON to the drift topic, keyed by modality, and to `on_alarm` (the retrain
trigger). An alarm the broker does not take is kept and sent again with the next batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from mmops.config import DriftConfig
from mmops.monitoring.monitor import DriftEvent, DriftMonitor, Observed
from mmops.serving.embeddings import PREDICTION, References
from mmops.serving.logs import log_data
from mmops.serving.predictor import EMBEDS_KEY, Predictor
from mmops.stream.metrics import StreamMetrics

log = logging.getLogger(__name__)

_PENDING_MAX = 100  # alarms kept while the broker is away
_BURST_S = 0.2  # compute time the monitor may spend at once after a quiet spell
_CALIBRATED_MAX = 4  # versions whose calibration a process keeps (a swap back, a restart)
# (model, version, references' digest, config) -> a calibrated monitor, for `fresh` copies.
_calibrated: OrderedDict[tuple[str, str, str, DriftConfig], DriftMonitor] = OrderedDict()
_calibrated_lock = threading.Lock()


def calibrated_monitor(
    references: References, cfg: DriftConfig, model: str, version: str
) -> DriftMonitor:
    """A fresh monitor for the version: calibrated now, or copied from this process's last
    calibration of the same references under the same settings (seconds saved per signal)."""
    key = (model, version, references.digest(), cfg)
    with _calibrated_lock:
        known = _calibrated.get(key)
        if known is not None:
            _calibrated.move_to_end(key)
            return known.fresh()
    monitor = DriftMonitor(references, cfg, model, version)
    with _calibrated_lock:
        _calibrated[key] = monitor
        while len(_calibrated) > _CALIBRATED_MAX:
            _calibrated.popitem(last=False)
    return monitor.fresh()


_STOP = object()


def observed(
    predicted: Sequence[tuple[Any, Mapping[str, Any], Mapping[str, Any]]],
    labels: Sequence[str],
    label_field: str,
) -> Observed:
    """The monitor's view of a batch: (message, event, result) of each predicted event."""
    signals: dict[str, list[Any]] = {}
    for _, _, result in predicted:
        for modality, vector in result[EMBEDS_KEY].items():
            signals.setdefault(modality, []).append(vector)
        scores = result["scores"]
        signals.setdefault(PREDICTION, []).append([scores[label] for label in labels])
    events = [event for _, event, _ in predicted]
    # A modality that is an event field and absent from an event is the model's stand-in for
    # it, not data: that row is not watched. The fused embedding is never absent.
    inputs = [m for m in signals if any(m in event for event in events)]
    present = {m: np.array([e.get(m) is not None for e in events], dtype=bool) for m in inputs}
    own = [event.get(label_field) for event in events]
    return Observed(
        [(m.topic, m.partition, m.offset) for m, _, _ in predicted],
        {name: np.asarray(rows, dtype=np.float64) for name, rows in signals.items()},
        present,
        [None if label is None else str(label) for label in own],
    )


class DriftWatch:
    """The monitor's thread: `start`, `follow(predictor)` per served version, `submit`, `close`."""

    def __init__(
        self,
        cfg: DriftConfig,
        metrics: StreamMetrics,
        producer: Callable[[], Any],
        on_alarm: Callable[[DriftEvent], None] | None = None,
        send_timeout_s: float = 10.0,
    ) -> None:
        self.cfg, self.metrics = cfg, metrics
        self._producer, self._on_alarm = producer, on_alarm
        self._send_timeout_s = send_timeout_s
        self._queue: queue.Queue[Any] = queue.Queue(cfg.queue_batches)
        self._thread: threading.Thread | None = None
        self.monitor: DriftMonitor | None = None
        self.alarms: list[DriftEvent] = []  # every alarm raised, for stats and tests
        self._pending: list[DriftEvent] = []
        self.ready = threading.Event()  # set once a version's detectors are calibrated
        # A token bucket of compute time: it fills at max_busy_share of wall time (up to
        # _BURST_S), each monitored batch takes what it cost, and an empty one skips batches.
        self._allowance, self._filled = _BURST_S, time.monotonic()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mmops-drift", daemon=True)
        self._thread.start()

    def follow(self, predictor: Predictor) -> None:
        """Watch against `predictor`'s references from the next batch on (calibrated on the
        watch's thread)."""
        self._put(("follow", predictor))

    def submit(
        self,
        predicted: Sequence[tuple[Any, Mapping[str, Any], Mapping[str, Any]]],
        dead_letters: int,
        label_field: str,
    ) -> None:
        """Queue an acknowledged batch's predicted events (message, event, result) and its
        dead-letter count; never blocks: a batch the monitor cannot keep up with is skipped.
        The monitor's view of it is built on the watch's thread."""
        try:
            self._queue.put_nowait(("observe", (predicted, dead_letters, label_field)))
        except queue.Full:
            self.metrics.drift_skipped.inc()

    def close(self, timeout_s: float = 5.0) -> None:
        if self._thread is None:
            return
        self._put(_STOP)
        self._thread.join(timeout_s)
        self._thread = None

    def drain(self, timeout_s: float = 60.0) -> bool:
        """Wait until every queued batch is handled (tests and the benchmark)."""
        done = threading.Event()
        self._put(("mark", done))
        return done.wait(timeout_s)

    def _put(self, item: Any) -> None:
        while True:  # control messages wait for room; batches are the ones skipped
            try:
                self._queue.put(item, timeout=1.0)
                return
            except queue.Full:
                if self._thread is None or not self._thread.is_alive():
                    return

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            kind, value = item
            try:
                if kind == "follow":
                    self._calibrate(value)
                elif kind == "observe" and self.monitor is not None:
                    self._within_budget(value)
                elif kind == "mark":
                    value.set()
            except Exception as error:  # the monitor never takes serving down with it
                log.warning(
                    "drift monitor failed on a batch",
                    extra=log_data(error=f"{type(error).__name__}: {error}"),
                )

    def _calibrate(self, predictor: Predictor) -> None:
        self.ready.clear()
        self.monitor = None
        identity, references = predictor.identity, predictor.references
        if references is None:
            log.warning(
                "no reference embeddings: drift is not monitored (export the model again)",
                extra=log_data(version=identity.version),
            )
            return
        monitor = calibrated_monitor(references, self.cfg, identity.name, identity.version)
        self.metrics.set_references(monitor)
        self.monitor = monitor
        self.ready.set()
        log.info(
            "drift monitor calibrated",
            extra=log_data(
                version=identity.version,
                signals=list(monitor.signals),
                window=self.cfg.window,
                reference=references.size,
            ),
        )

    def _within_budget(self, item: tuple[Any, int, str]) -> None:
        now = time.monotonic()
        share = self.cfg.max_busy_share
        self._allowance = min(_BURST_S, self._allowance + (now - self._filled) * share)
        self._filled = now
        if self._allowance <= 0:
            self.metrics.drift_skipped.inc()  # served, not monitored: a sample is watched
            return
        start = time.perf_counter()
        self._observe(item)
        self._allowance -= time.perf_counter() - start

    def _observe(self, item: tuple[Any, int, str]) -> None:
        monitor = self.monitor
        assert monitor is not None
        predicted, dead_letters, label_field = item
        # Results the served version made without embeddings (none should) are not watched.
        batch = observed([p for p in predicted if EMBEDS_KEY in p[2]], monitor.labels, label_field)
        batch.dead_letters = dead_letters
        started = monitor.observe(batch)
        self.metrics.set_drift(monitor)
        for alarm in started:
            log.warning("drift alarm", extra=log_data(**alarm.to_dict()))
            self.alarms.append(alarm)
            if self._on_alarm is not None:
                self._on_alarm(alarm)
        self._pending = (self._pending + started)[-_PENDING_MAX:]
        if self._pending:
            self._send()

    def _send(self) -> None:
        """Send the pending alarms; those the broker did not take stay pending."""
        try:
            producer = self._producer()
            futures = [
                producer.send(
                    self.cfg.topic,
                    key=alarm.modality.encode(),
                    value=orjson.dumps(alarm.to_dict()),
                )
                for alarm in self._pending
            ]
            for future in futures:
                future.get(timeout=self._send_timeout_s)
            self._pending = []
        except Exception as error:
            log.warning(
                "drift events not sent; they are sent again with the next batch",
                extra=log_data(error=f"{type(error).__name__}: {error}", kept=len(self._pending)),
            )
