"""Micro-batch bookkeeping of the stream consumer, free of clients and threads.

The open batch and the batches being predicted, when a batch closes, when it may go to a worker,
which batch is sent next, and which offsets to commit or to rewind to.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from mmops.stream.outputs import Served

# A message's (topic, partition); equal to, and hashed like, kafka-python's TopicPartition.
Partition = tuple[str, int]


@dataclass
class Flight:
    """A micro-batch on its way: predicted on a worker thread, then sent and committed in turn."""

    batch: list[Any]
    job: Future[Served]


class Batches:
    """The batch being collected and the batches being predicted, oldest first; none sent yet.

    The open batch closes at `max_batch` messages, at `max_bytes` of raw messages (one larger
    message is a batch of its own), or `max_wait_ms` after its first. A closed
    batch goes to a worker while fewer than `workers` are predicting, and predicted batches are
    sent in the order they closed, whichever finished first.
    """

    def __init__(
        self,
        max_batch: int,
        max_wait_ms: int,
        workers: int,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int | None = None,
    ) -> None:
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.workers = workers
        self.clock = clock
        self.max_bytes = max_bytes
        self.open: list[Any] = []
        self.open_bytes = 0
        # Polled past the open batch's byte limit: the next batch starts with them, in order.
        self.waiting: deque[Any] = deque()
        self.closes_at = 0.0  # max_wait_ms after the open batch's first message
        self.flights: deque[Flight] = deque()

    @property
    def full(self) -> bool:
        if self.waiting or len(self.open) >= self.max_batch:
            return True
        return self.max_bytes is not None and self.open_bytes >= self.max_bytes

    @property
    def room(self) -> int:
        """How many more messages the open batch takes."""
        return 0 if self.full else self.max_batch - len(self.open)

    @property
    def in_hand(self) -> int:
        """Messages polled and not yet sent."""
        return sum(len(f.batch) for f in self.flights) + len(self.open) + len(self.waiting)

    @property
    def idle(self) -> bool:
        return not self.open and not self.flights

    def poll_timeout_ms(self) -> int:
        """How long the next poll may wait: until the open batch closes, or briefly while a
        batch in flight may be predicted and waits to be sent."""
        if self.open:
            if self.flights:
                return 5
            return max(1, int((self.closes_at - self.clock()) * 1000))
        return 5 if self.flights else 200

    def add(self, messages: Iterable[Any]) -> None:
        """Polled messages join the open batch, up to its byte limit (the rest wait for the
        next); the first one starts its max_wait_ms."""
        self.waiting.extend(messages)
        while self.waiting and len(self.open) < self.max_batch:
            size = 0 if self.max_bytes is None else message_size(self.waiting[0])
            if self.open and self.max_bytes is not None and self.open_bytes + size > self.max_bytes:
                break
            if not self.open:
                self.closes_at = self.clock() + self.max_wait_ms / 1000
            self.open.append(self.waiting.popleft())
            self.open_bytes += size

    def closed(self) -> bool:
        """The open batch is done collecting: full, or max_wait_ms after its first message."""
        return bool(self.open) and (self.full or self.clock() >= self.closes_at)

    def running(self) -> list[Future[Served]]:
        """The batches still being predicted."""
        return [flight.job for flight in self.flights if not flight.job.done()]

    def can_dispatch(self) -> bool:
        """The open batch has closed and a worker is free for it."""
        return self.closed() and len(self.running()) < self.workers

    def dispatch(self, submit: Callable[[list[Any]], Future[Served]]) -> list[Any]:
        """Start predicting the open batch with `submit`; a new batch opens. Returns the batch."""
        batch, self.open, self.open_bytes = self.open, [], 0
        self.flights.append(Flight(batch, submit(batch)))
        self.add(())  # those waiting open the next batch
        return batch

    def next_predicted(self) -> Flight | None:
        """The oldest batch once it is predicted: the next to send (younger ones wait for it)."""
        if self.flights and self.flights[0].job.done():
            return self.flights[0]
        return None

    def sent(self) -> None:
        """The oldest batch was sent and committed."""
        self.flights.popleft()

    def forget(self) -> list[Any]:
        """Drop the batches not yet sent (their predictions are never produced); returns their
        messages, oldest first."""
        dropped = [m for flight in self.flights for m in flight.batch] + self.open
        dropped += self.waiting
        for flight in self.flights:
            flight.job.cancel()  # one already running finishes; its result is ignored
        self.flights.clear()
        self.open, self.open_bytes = [], 0
        self.waiting.clear()
        return dropped


def message_size(message: Any) -> int:
    """A message's raw key and value bytes (headers are capped by the broker's record size)."""
    return sum(len(part) for part in (message.value, message.key) if part is not None)


def partition_of(message: Any) -> Partition:
    return (message.topic, message.partition)


def rewind_offsets(
    messages: Iterable[Any], assigned: Collection[Partition]
) -> dict[Partition, int]:
    """Where to seek to read `messages` (oldest first) again: each assigned partition's first.

    A partition no longer assigned is left alone: its new owner reads it from the committed
    offset.
    """
    first: dict[Partition, int] = {}
    for message in messages:
        first.setdefault(partition_of(message), message.offset)
    return {partition: offset for partition, offset in first.items() if partition in assigned}


def commit_offsets(batch: Iterable[Any], assigned: Collection[Partition]) -> dict[Partition, int]:
    """The offsets that commit a sent batch: past its last message in each assigned partition
    (a revoked partition's new owner serves it again)."""
    offsets: dict[Partition, int] = {}
    for message in batch:
        if partition_of(message) in assigned:
            offsets[partition_of(message)] = message.offset + 1
    return offsets
