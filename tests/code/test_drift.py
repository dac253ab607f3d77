"""The online drift detectors and the monitor, on seeded synthetic embeddings (no services)."""

from __future__ import annotations

import itertools
import time
from types import SimpleNamespace

import numpy as np
import pytest

from mmops.config import DriftConfig
from mmops.monitoring.drift import OnlineDetector, mmd2, rbf
from mmops.monitoring.monitor import DriftMonitor, Observed
from mmops.serving.embeddings import References, sample_references
from mmops.serving.predictor import EMBEDS_KEY
from mmops.serving.runners import Outputs
from mmops.stream.drift import calibrated_monitor, observed

WIDTH = 16


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_the_sliding_statistics_equal_a_direct_mmd_whatever_the_batches() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(300, WIDTH))
    detector = OnlineDetector(reference, 50, 20_000, streams=50)
    x = rng.normal(size=(700, WIDTH)) + np.linspace(0, 1, 700)[:, None] * 0.3
    bounds = [0, 7, 60, 130, 131, 400, 700]
    readings = [detector.update(x[a:b]) for a, b in itertools.pairwise(bounds)]
    mmd = np.concatenate([r.mmd for r in readings])
    novel = np.concatenate([r.novel for r in readings])
    # Live kernels are single precision: the same `near` as the detector's, MMD to ~1e-7.
    near = rbf(x.astype(np.float32), reference.astype(np.float32), detector.gamma).mean(1)
    assert np.isnan(mmd[:49]).all()
    for t in (49, 50, 77, 130, 131, 399, 450, 699):
        window = x[t - 49 : t + 1]
        assert mmd[t] == pytest.approx(mmd2(window, reference, detector.gamma), abs=2e-6)
        assert novel[t] == (near[t - 49 : t + 1] < detector.cutoff).sum()


def test_reset_starts_again_on_the_same_calibration() -> None:
    rng = np.random.default_rng(1)
    detector = OnlineDetector(rng.normal(size=(200, WIDTH)), 40, 10_000, streams=50)
    x = rng.normal(size=(100, WIDTH))
    first = detector.update(x).mmd
    detector.reset()
    np.testing.assert_allclose(detector.update(x).mmd, first)


def alarm_at(detector: OnlineDetector, stream: np.ndarray) -> int | None:
    over = np.concatenate(
        [detector.update(stream[i : i + 64]).alarms(detector) for i in range(0, len(stream), 64)]
    )
    hits = np.flatnonzero(over)
    return int(hits[0]) if len(hits) else None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_false_alarm_on_fresh_data_of_the_reference_law(seed: int) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, WIDTH)) * 2

    def draw(n: int) -> np.ndarray:  # a mixture of clusters, like class embeddings
        return unit(centres[rng.integers(0, 5, n)] + rng.normal(size=(n, WIDTH)))

    detector = OnlineDetector(draw(400), 100, 50_000, seed=seed)
    assert alarm_at(detector, draw(5000)) is None


def test_a_shift_alarms_soon_and_a_small_share_of_outliers_is_counted() -> None:
    rng = np.random.default_rng(3)
    reference = unit(rng.normal(size=(400, WIDTH)))
    detector = OnlineDetector(reference, 100, 50_000)
    before = unit(rng.normal(size=(500, WIDTH)))
    moved = unit(rng.normal(size=(1000, WIDTH)) + 0.8 * np.eye(WIDTH)[0])
    at = alarm_at(detector, np.concatenate([before, moved]))
    assert at is not None and 500 <= at < 500 + 200
    # One event in ten far from everything the reference holds: the MMD barely moves, the
    # count of novel events does.
    detector = OnlineDetector(rng.normal(size=(400, WIDTH)), 100, 50_000)
    mixed = rng.normal(size=(1500, WIDTH))
    far = (rng.random(1500) < 0.1) & (np.arange(1500) >= 500)
    mixed[far] += 4 * np.eye(WIDTH)[1]
    reading = [detector.update(mixed[i : i + 100]) for i in range(0, 1500, 100)]
    mmd = np.concatenate([r.mmd for r in reading])
    assert np.nanmax(mmd) < detector.mmd.threshold
    assert (at := alarm_at_reset(detector, mixed)) is not None and 500 <= at < 500 + 500


def alarm_at_reset(detector: OnlineDetector, stream: np.ndarray) -> int | None:
    detector.reset()
    return alarm_at(detector, stream)


def references(rng: np.random.Generator, n: int = 300) -> References:
    probs = rng.dirichlet(np.ones(3) * 0.3, n)
    embeds = {m: unit(rng.normal(size=(n, WIDTH))) for m in ("image", "text", "fused")}
    outputs = Outputs(probs, embeds)
    return sample_references({"val": outputs}, ["a", "b", "c"], 1000, "int8")


def batch(rng: np.random.Generator, n: int, start: int, move: str | None = None) -> Observed:
    signals = {m: unit(rng.normal(size=(n, WIDTH))) for m in ("image", "text", "fused")}
    if move is not None:
        signals[move] = unit(signals[move] + 1.5 * np.eye(WIDTH)[2])
    signals["prediction"] = rng.dirichlet(np.ones(3) * 0.3, n)
    positions = [("events", 0, start + i) for i in range(n)]
    present = {"image": np.ones(n, dtype=bool), "text": np.ones(n, dtype=bool)}
    return Observed(positions, signals, present, ["a"] * n)


def test_the_monitor_names_only_the_signal_that_moved_once_per_shift() -> None:
    rng = np.random.default_rng(4)
    cfg = DriftConfig(window=100, ert=10_000, streams=100, horizon=500)
    monitor = DriftMonitor(references(rng), cfg, "m", "3")
    assert set(monitor.signals) == {"image", "text", "fused", "prediction"}
    alarms = []
    for i in range(10):
        alarms += monitor.observe(batch(rng, 64, 64 * i))
    assert alarms == []
    for i in range(10, 30):
        alarms += monitor.observe(batch(rng, 64, 64 * i, move="text"))
    assert [a.modality for a in alarms] == ["text"]
    alarm = alarms[0]
    assert alarm.version == "3" and alarm.statistic > alarm.threshold
    first, last = alarm.window["first"]["offset"], alarm.window["last"]["offset"]
    assert last - first == cfg.window - 1 and last >= 640
    assert monitor.signals["text"].alarm and not monitor.signals["image"].alarm


def test_a_version_calibrated_once_gives_fresh_monitors_that_read_alike_and_apart() -> None:
    rng = np.random.default_rng(6)
    cfg = DriftConfig(window=60, ert=10_000, streams=60, horizon=300)
    refs = references(rng)
    first = calibrated_monitor(refs, cfg, "m", "4")
    start = time.perf_counter()
    second = calibrated_monitor(refs, cfg, "m", "4")
    assert time.perf_counter() - start < 0.5  # no calibration the second time
    third = calibrated_monitor(refs, DriftConfig(window=80, streams=60, horizon=300), "m", "4")
    assert third.signals["text"].detector.window == 80  # other settings: calibrated anew
    events = [batch(rng, 64, 64 * i, move="text" if i > 4 else None) for i in range(12)]
    alarms = [a.modality for e in events for a in first.observe(e)]
    assert alarms and [a.modality for e in events for a in second.observe(e)] == alarms
    for name, state in first.signals.items():
        assert state.statistic == second.signals[name].statistic
        assert state.detector is not second.signals[name].detector
    assert first.events == second.events == 12 * 64
    assert calibrated_monitor(refs, cfg, "m", "4").events == 0  # what they saw is their own


def test_rolling_figures_follow_the_labelled_events_and_dead_letters() -> None:
    rng = np.random.default_rng(5)
    cfg = DriftConfig(window=100, ert=10_000, streams=50, horizon=200, rolling_events=100)
    monitor = DriftMonitor(references(rng), cfg)
    probs = np.tile([0.1, 0.8, 0.1], (10, 1))
    signals = {"prediction": probs}
    labels = ["b"] * 6 + ["a"] * 2 + [None] * 2
    monitor.observe(Observed([("t", 0, i) for i in range(10)], signals, {}, labels, 10))
    assert monitor.accuracy() == pytest.approx(6 / 8)
    assert monitor.label_shares() == {"a": 0.0, "b": 1.0, "c": 0.0}
    assert monitor.mean_confidence() == pytest.approx(0.8)
    assert monitor.dead_letter_rate() == pytest.approx(0.5)


def test_an_absent_modality_is_not_watched_and_references_leave_it_out() -> None:
    message = SimpleNamespace(topic="t", partition=1, offset=7)
    vector = np.ones(4)
    result = {"scores": {"a": 0.2, "b": 0.8}, EMBEDS_KEY: {"image": vector, "text": vector}}
    rows = [
        (message, {"id": "1", "image": "x", "text": None, "label": "b"}, result),
        (message, {"id": "2", "image": None, "text": "hi"}, result),
    ]
    seen = observed(rows, ["a", "b"], "label")
    assert seen.present["image"].tolist() == [True, False]
    assert seen.present["text"].tolist() == [False, True]
    assert seen.labels == ["b", None] and seen.positions[0] == ("t", 1, 7)
    np.testing.assert_allclose(seen.signals["prediction"], [[0.2, 0.8], [0.2, 0.8]])
    probs = np.full((4, 2), 0.5)
    outputs = Outputs(probs, {"image": np.arange(8.0).reshape(4, 2)})
    present = {"image": np.array([True, False, True, False])}
    kept = sample_references({"val": outputs}, ["a", "b"], 10, "fp32", 0, present)
    assert kept.embeds["image"].tolist() == [[0.0, 1.0], [4.0, 5.0]] and kept.size == 4


# An exhausted budget lets through at most the batch that overdraws it.
@pytest.mark.parametrize(("share", "batches"), [(1.0, (20, 20)), (1e-9, (0, 1))])
def test_the_watch_keeps_to_its_compute_budget_by_skipping_batches(
    share: float, batches: tuple[int, int]
) -> None:
    from mmops.stream.drift import DriftWatch
    from mmops.stream.metrics import StreamMetrics

    rng = np.random.default_rng(7)
    cfg = DriftConfig(window=40, ert=10_000, streams=50, horizon=200, max_busy_share=share)
    metrics = StreamMetrics()
    watch = DriftWatch(cfg, metrics, lambda: None)
    watch._allowance = 0.0 if share < 1 else 10.0  # an exhausted budget, or a large one
    refs = references(rng)
    version = SimpleNamespace(identity=SimpleNamespace(name="m", version="9"), references=refs)
    watch.start()
    watch.follow(version)  # type: ignore[arg-type]
    message = SimpleNamespace(topic="t", partition=0, offset=0)
    for _ in range(20):
        vectors = unit(rng.normal(size=(16, WIDTH)))
        rows = [
            (
                message,
                {"id": "e"},
                {
                    "scores": dict(zip("abc", p, strict=True)),
                    EMBEDS_KEY: {"image": v, "text": v, "fused": v},
                },
            )
            for v, p in zip(vectors, rng.dirichlet(np.ones(3), 16), strict=True)
        ]
        watch.submit(rows, 0, "label")
    assert watch.drain()
    watch.close()
    assert watch.monitor is not None
    watched = watch.monitor.events // 16
    assert batches[0] <= watched <= batches[1]
    skipped = metrics.registry.get_sample_value("mmops_drift_skipped_batches_total")
    assert skipped == 20 - watched
