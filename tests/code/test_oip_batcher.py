"""The adaptive batcher as pure logic: batches across requests, AIMD on the cap, the wait the
latency allows, one outcome per request whatever happens."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError
from typing import Any

import pytest

from mmops.serving.oip.batcher import AdaptiveBatcher, Overloaded, ServiceFit


class SlowModel:
    """A model taking `fixed + per_record * n` seconds a batch; records its batch sizes."""

    def __init__(self, fixed: float = 0.01, per_record: float = 0.0005) -> None:
        self.fixed, self.per_record = fixed, per_record
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, records: list[Any]) -> list[Any]:
        self.gate.wait()
        self.sizes.append(len(records))
        time.sleep(self.fixed + self.per_record * len(records))
        return [record * 10 for record in records]


def batcher(model: Any, **kwargs: Any) -> AdaptiveBatcher:
    args = {"max_batch": 16, "max_wait_s": 0.005, "target_s": 0.1, "max_queue": 1000}
    return AdaptiveBatcher(model, **{**args, **kwargs})


def test_each_request_gets_its_own_results_in_order_and_queued_requests_share_a_batch() -> None:
    model = SlowModel()
    model.gate.clear()  # hold the worker so requests queue behind the first
    b = batcher(model)
    first = b.submit([0])
    time.sleep(0.05)
    futures = [b.submit([i, i + 1]) for i in range(1, 15, 2)]
    model.gate.set()
    assert first.result(5) == [0]
    assert [f.result(5) for f in futures] == [[i * 10, (i + 1) * 10] for i in range(1, 15, 2)]
    assert model.sizes[0] == 1 and max(model.sizes) > 2  # the queued requests were batched
    assert sum(model.sizes) == 15
    b.close()


def test_a_request_is_never_split_and_the_cap_bounds_a_batch() -> None:
    model = SlowModel()
    model.gate.clear()
    b = batcher(model, max_batch=4)
    futures = [b.submit([1, 2, 3]) for _ in range(4)]
    big = b.submit(list(range(10)))  # larger than the cap: a batch of its own
    model.gate.set()
    assert all(f.result(5) == [10, 20, 30] for f in futures)
    assert big.result(5) == [i * 10 for i in range(10)]
    assert all(size in (3, 10) for size in model.sizes), model.sizes
    b.close()


def test_the_cap_grows_under_the_target_and_backs_off_by_a_tenth_over_it() -> None:
    fast = batcher(SlowModel(fixed=0.001), max_batch=8, target_s=0.5)
    fast.stats.cap = 2
    for _ in range(10):
        fast.submit([1]).result(5)
    assert fast.stats.cap == 8  # +1 per batch in target, up to max_batch
    fast.close()
    slow = batcher(SlowModel(fixed=0.05), max_batch=20, target_s=0.01)
    for _ in range(3):
        slow.submit([1]).result(5)
    assert slow.stats.cap == int(int(int(20 * 0.9) * 0.9) * 0.9)
    slow.close()


def test_a_lone_request_waits_no_longer_than_max_wait_and_the_latency_budget() -> None:
    b = batcher(SlowModel(fixed=0.0), max_wait_s=0.2, target_s=0.05)
    b.submit([1]).result(5)  # a first batch: the arrival gap is not known, nothing waits
    start = time.monotonic()
    b.submit([1]).result(5)
    # requests do not arrive faster than the time left, so it ran without waiting the 0.2 s
    assert time.monotonic() - start < 0.15
    b.close()


def test_a_model_error_reaches_every_request_of_its_batch_and_the_next_batch_is_served() -> None:
    calls = {"n": 0}

    def flaky(records: list[Any]) -> list[Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("model broke")
        return records

    b = batcher(flaky)
    with pytest.raises(RuntimeError, match="model broke"):
        b.submit([1]).result(5)
    assert b.submit([2]).result(5) == [2]
    b.close()


def test_a_cancelled_request_does_not_break_its_batch_and_overload_is_refused() -> None:
    model = SlowModel()
    model.gate.clear()
    b = batcher(model, max_queue=4)
    running = b.submit([1])
    time.sleep(0.05)
    gone, kept = b.submit([1, 2]), b.submit([3])
    assert gone.cancel()
    with pytest.raises(Overloaded, match=r"serve\.max_queue"):
        b.submit([4, 5])
    model.gate.set()
    assert running.result(5) == [10] and kept.result(5) == [30]
    with pytest.raises(CancelledError):
        gone.result(0)
    b.close()


def test_before_batch_runs_between_batches_only_and_stalled_names_a_stuck_batch() -> None:
    running = threading.Event()
    seen: list[bool] = []

    def model(records: list[Any]) -> list[Any]:
        running.set()
        time.sleep(0.3)
        running.clear()
        return records

    b = batcher(model, before_batch=lambda: seen.append(running.is_set()))
    future = b.submit([1])
    time.sleep(0.1)
    assert b.stalled(0.05) is not None and "a batch has run" in b.stalled(0.05)
    assert future.result(5) == [1]
    assert b.stalled(0.05) is None
    assert seen and not any(seen)  # never while a batch ran
    b.close()


def test_the_service_fit_recovers_fixed_and_per_record_cost() -> None:
    fit = ServiceFit()
    for size in (1, 4, 16, 32) * 5:
        fit.add(size, 0.002 + 0.0005 * size)
    assert fit.predict(8) == pytest.approx(0.006, rel=1e-6)
    single = ServiceFit()
    single.add(8, 0.008)
    assert single.predict(16) == pytest.approx(0.016)
    assert ServiceFit().predict(5) == 0.0
