"""Adaptive batching across concurrent requests: one worker, one model version per batch.

Requests (each a list of records) queue; one worker thread takes what is queued into a batch of
at most the current cap, runs it, and hands each request its own results. The cap follows
Clipper's adaptive batching (Crankshaw et al., "Clipper: A Low-Latency Online Prediction Serving
System", NSDI 2017, section 4.3): additive increase while a batch's service time stays under the
latency target, multiplicative decrease (by 10%) when one exceeds it. Clipper's delayed batching
waits for a fuller batch up to a timeout; here the wait is bounded twice, by `max_wait_s` and by
what the latency target leaves once the batch's expected service time (a running fit of time
against batch size) is counted, and only waits while requests are arriving fast enough to fill
it. Under load the queue fills while a batch runs, so batches form without waiting.

Between batches the worker calls `before_batch` (the champion's hot swap), so every request is
served by exactly one version.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

# Clipper's multiplicative backoff, and the additive step (records) after a batch in target.
BACKOFF = 0.9
STEP = 1
# An idle worker still swaps in a new champion after at most this many seconds.
IDLE_S = 1.0
# Weight of the newest observation in the running estimates (exponential moving averages).
EWMA = 0.2


class Overloaded(RuntimeError):
    """More records wait than `max_queue`: the request is refused (503, retry later)."""


@dataclass
class _Request:
    records: list[Any]
    future: Future[Any]
    arrived: float


@dataclass
class BatchStats:
    """What the batcher reports to metrics: per batch, and the current cap."""

    batches: int = 0
    records: int = 0
    last_size: int = 0
    cap: int = 1
    sizes: collections.Counter[int] = field(default_factory=collections.Counter)


class AdaptiveBatcher:
    """`submit(records)` returns a Future of `run(records)`'s results for those records."""

    def __init__(
        self,
        run: Callable[[list[Any]], list[Any]],
        max_batch: int,
        max_wait_s: float,
        target_s: float,
        max_queue: int,
        before_batch: Callable[[], None] = lambda: None,
        on_batch: Callable[[int, float, float], None] = lambda size, wait, service: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run = run
        self.max_batch, self.max_wait_s, self.target_s = max_batch, max_wait_s, target_s
        self.max_queue = max_queue
        self.before_batch, self.on_batch, self.clock = before_batch, on_batch, clock
        self.stats = BatchStats(cap=max_batch)
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued = 0  # records in the queue
        self._cond = threading.Condition()
        self._closed = False
        self._fit = ServiceFit()
        self._gap_s = float("inf")  # mean time between arrivals
        self._last_arrival: float | None = None
        self.busy_since: float | None = None  # while a batch runs: since when
        self.last_done = clock()
        self._thread = threading.Thread(target=self._work, name="oip-batcher", daemon=True)
        self._thread.start()

    def submit(self, records: list[Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._cond:
            if self._closed:
                raise Overloaded("the server is shutting down")
            if self._queued and self._queued + len(records) > self.max_queue:
                raise Overloaded(
                    f"{self._queued} records wait (serve.max_queue {self.max_queue}); retry later"
                )
            now = self.clock()
            if self._last_arrival is not None:
                gap = now - self._last_arrival
                self._gap_s = gap if self._gap_s == float("inf") else _mean(self._gap_s, gap)
            self._last_arrival = now
            self._queue.append(_Request(records, future, now))
            self._queued += len(records)
            self._cond.notify()
        return future

    @property
    def queued(self) -> int:
        return self._queued

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def expected_s(self, size: int) -> float:
        """The service time a batch of `size` records is expected to take."""
        return self._fit.predict(size)

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._serve(batch)

    def _take(self) -> list[_Request] | None:
        """The next batch: what is queued up to the cap, after a wait the latency allows."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                if not self._cond.wait(IDLE_S):
                    self.before_batch()  # idle: a new champion is swapped in all the same
            cap = self.stats.cap
            deadline = self._queue[0].arrived + self._wait_budget(cap)
            while self._queued < cap and not self._closed:
                left = deadline - self.clock()
                # Wait only while another request is likely to come in time.
                if left <= 0 or self._gap_s > left:
                    break
                self._cond.wait(left)
            batch: list[_Request] = []
            size = 0
            while self._queue and (not batch or size + len(self._queue[0].records) <= cap):
                request = self._queue.popleft()
                batch.append(request)
                size += len(request.records)
            self._queued -= size
            return batch

    def _wait_budget(self, cap: int) -> float:
        return max(0.0, min(self.max_wait_s, self.target_s - self.expected_s(cap)))

    def _serve(self, batch: list[_Request]) -> None:
        records = [record for request in batch for record in request.records]
        start = self.clock()
        self.busy_since = start
        try:
            self.before_batch()
            results = self.run(records)
        except BaseException as error:  # every waiting request learns of it
            for request in batch:
                _settle(request.future, error=error)
            results = None
        finally:
            self.busy_since = None
            self.last_done = self.clock()
        service = self.last_done - start
        if results is not None:
            done = 0
            for request in batch:
                _settle(request.future, results[done : done + len(request.records)])
                done += len(request.records)
        self._learn(len(records), service)
        self.on_batch(len(records), start - batch[0].arrived, service)

    def _learn(self, size: int, service: float) -> None:
        """AIMD on the cap, and the service-time fit (per record from the two sizes seen)."""
        stats = self.stats
        stats.batches += 1
        stats.records += size
        stats.last_size = size
        stats.sizes[size] += 1
        if service <= self.target_s:
            stats.cap = min(self.max_batch, stats.cap + STEP)
        else:
            stats.cap = max(1, int(stats.cap * BACKOFF))
        self._fit.add(size, service)

    def stalled(self, timeout_s: float) -> str | None:
        """Why the worker looks stuck (a batch running, or requests waiting, with nothing done
        for `timeout_s`), or None."""
        now = self.clock()
        busy = self.busy_since
        if busy is not None and now - busy > timeout_s:
            return f"a batch has run for {now - busy:.0f} s"
        if not self._thread.is_alive() and not self._closed:
            return "the batching worker has stopped"
        if self._queued and now - self.last_done > timeout_s:
            return f"{self._queued} records wait and none served for {now - self.last_done:.0f} s"
        return None


class ServiceFit:
    """Service time against batch size, `fixed + per_record * size`: least squares over the
    batches seen, older ones weighed down by (1 - EWMA) each batch."""

    def __init__(self) -> None:
        self.sums = [0.0] * 5  # weight, n, t, n*n, n*t

    def add(self, size: int, seconds: float) -> None:
        new = (1.0, size, seconds, size * size, size * seconds)
        self.sums = [(1 - EWMA) * old + value for old, value in zip(self.sums, new, strict=True)]

    def predict(self, size: int) -> float:
        w, n, t, nn, nt = self.sums
        if w == 0:
            return 0.0
        spread = w * nn - n * n
        if spread <= 1e-9 * w * w:  # one batch size seen: all of it per record
            return t / n * size if n else t / w
        per_record = max(0.0, (w * nt - n * t) / spread)
        fixed = max(0.0, (t - per_record * n) / w)
        return fixed + per_record * size


def _settle(future: Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    """Hand a request its outcome, unless it gave up waiting (a cancelled future)."""
    if future.cancelled():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled since
        pass


def _mean(old: float, new: float) -> float:
    return (1 - EWMA) * old + EWMA * new
