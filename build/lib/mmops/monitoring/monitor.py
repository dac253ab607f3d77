"""The drift monitor of one served version: per-signal detectors and rolling figures.

`DriftMonitor.observe` takes what an acknowledged batch predicted (`Observed`: embeddings by
modality, class probabilities, the events' own labels, dead letters) and returns the alarms
that started with it. It is generic over signal names: every modality the references carry is
watched, and `prediction` (the class probabilities) beside them. Each alarm latches until its
signal has stayed under both thresholds for a whole window, so one shift is one alarm.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmops.config import DriftConfig
from mmops.monitoring.drift import OnlineDetector, Reading
from mmops.serving.embeddings import References

Position = tuple[str, int, int]  # topic, partition, offset of a source event


@dataclass
class Observed:
    """What one batch predicted, row by row, for the monitor."""

    positions: list[Position]
    signals: dict[str, np.ndarray]  # per signal, a row per event
    present: dict[str, np.ndarray]  # per modality that can be absent: the rows that have it
    labels: list[str | None]  # each event's own label, when it came labelled
    dead_letters: int = 0

    @property
    def size(self) -> int:
        return len(self.positions)


@dataclass(frozen=True)
class DriftEvent:
    """An alarm: the signal, the test and the window of source events it fired on."""

    model: str
    version: str
    modality: str
    test: str  # mmd | novelty
    statistic: float
    threshold: float
    window: dict[str, dict[str, Any]]  # first and last source event of the window
    events_seen: int
    ts: int = field(default_factory=lambda: int(time.time() * 1000))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "modality": self.modality,
            "test": self.test,
            "statistic": self.statistic,
            "threshold": self.threshold,
            "window": self.window,
            "events_seen": self.events_seen,
            "ts": self.ts,
        }


@dataclass
class SignalState:
    """One signal's detector, its window's positions and its alarm."""

    detector: OnlineDetector
    positions: deque[Position]
    alarm: bool = False
    quiet: int = 0  # events since the last reading over a threshold
    statistic: float = float("nan")
    novel: float = float("nan")


class DriftMonitor:
    """Detectors for every signal of `references`; build off the serving path (calibration)."""

    def __init__(
        self, references: References, cfg: DriftConfig, model: str = "", version: str = ""
    ) -> None:
        self.references, self.cfg = references, cfg
        self.model, self.version = model, version
        signals = {n: r for n, r in references.signals().items() if len(r) >= 20}
        # The monitor's ERT is shared by its signals: each alarms len(signals) times as rarely.
        ert = cfg.ert * max(1, len(signals))
        self.signals = {
            name: SignalState(
                OnlineDetector(reference, cfg.window, ert, cfg.streams, cfg.horizon, cfg.seed + i),
                deque(maxlen=cfg.window),
            )
            for i, (name, reference) in enumerate(signals.items())
        }
        self.labels = references.labels
        self._start_rolling()

    def _start_rolling(self) -> None:
        n = self.cfg.rolling_events
        self._predicted: deque[int] = deque(maxlen=n)
        self._confidence: deque[float] = deque(maxlen=n)
        self._outcomes: deque[tuple[int, int]] = deque(maxlen=n)  # (events, dead letters)
        self._correct: deque[bool] = deque(maxlen=n)
        self.events = 0

    def fresh(self) -> DriftMonitor:
        """The same calibrated detectors with nothing seen: a new monitor without the cost."""
        clone = copy.copy(self)
        clone.signals = {}
        for name, state in self.signals.items():
            detector = copy.copy(state.detector)
            detector.reset()
            clone.signals[name] = SignalState(detector, deque(maxlen=self.cfg.window))
        clone._start_rolling()
        return clone

    def observe(self, batch: Observed) -> list[DriftEvent]:
        """Update every signal with the batch; the alarms that started in it."""
        self._roll(batch)
        started = []
        for name, state in self.signals.items():
            rows = batch.present.get(name)
            take = np.arange(batch.size) if rows is None else np.flatnonzero(rows)
            values = batch.signals.get(name)
            if values is None or not len(take):
                continue
            reading = state.detector.update(values[take])
            started += self._alarms(name, state, reading, [batch.positions[i] for i in take])
        return started

    def _alarms(
        self, name: str, state: SignalState, reading: Reading, positions: Sequence[Position]
    ) -> list[DriftEvent]:
        detector = state.detector
        over = reading.alarms(detector)
        started = []
        for i, position in enumerate(positions):
            state.positions.append(position)
            if np.isnan(reading.mmd[i]):
                continue
            state.statistic, state.novel = float(reading.mmd[i]), float(reading.novel[i])
            if not over[i]:
                state.quiet += 1
                if state.alarm and state.quiet >= detector.window:
                    state.alarm = False
                continue
            state.quiet = 0
            if state.alarm:
                continue
            state.alarm = True
            mmd_fired = reading.mmd[i] > detector.mmd.threshold
            test, calibration = (
                ("mmd", detector.mmd) if mmd_fired else ("novelty", detector.novelty)
            )
            statistic = state.statistic if mmd_fired else state.novel
            started.append(
                DriftEvent(
                    self.model,
                    self.version,
                    name,
                    test,
                    statistic,
                    calibration.threshold,
                    {"first": _where(state.positions[0]), "last": _where(position)},
                    detector.seen,
                )
            )
        return started

    def _roll(self, batch: Observed) -> None:
        probs = batch.signals.get("prediction")
        self.events += batch.size
        self._outcomes.append((batch.size, batch.dead_letters))
        if probs is None or not len(probs):
            return
        best = probs.argmax(1)
        self._predicted.extend(best.tolist())
        self._confidence.extend(probs.max(1).tolist())
        for index, label in zip(best.tolist(), batch.labels, strict=True):
            if label is not None:
                self._correct.append(self.labels[index] == str(label))

    def label_shares(self) -> dict[str, float]:
        counts = np.bincount(list(self._predicted), minlength=len(self.labels))
        total = max(1, int(counts.sum()))
        return {label: float(c) / total for label, c in zip(self.labels, counts, strict=True)}

    def mean_confidence(self) -> float:
        return float(np.mean(self._confidence)) if self._confidence else float("nan")

    def dead_letter_rate(self) -> float:
        events = sum(n for n, _ in self._outcomes) + sum(d for _, d in self._outcomes)
        return sum(d for _, d in self._outcomes) / events if events else 0.0

    def accuracy(self) -> float | None:
        """Rolling accuracy on the labelled events; None before any."""
        return float(np.mean(self._correct)) if self._correct else None


def _where(position: Position) -> dict[str, Any]:
    topic, partition, offset = position
    return {"topic": topic, "partition": partition, "offset": offset}
