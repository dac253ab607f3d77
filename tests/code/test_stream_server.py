"""The stream consumer's rules, on in-memory fakes of the Kafka clients and the model: batching,
order, commit after ack, rewinds, dead letters and champion swaps (tests/integration has the
real broker)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from kafka.future import Future as KafkaFuture
from kafka.structs import TopicPartition

from mmops.config import Params, PredictConfig, load_params
from mmops.serving.champion import ModelSource
from mmops.stream.batching import Batches, commit_offsets, rewind_offsets
from mmops.stream.outputs import Served
from mmops.stream.server import ServeStats, StreamServer

TOPIC = "events"
P0, P1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


@dataclass
class Message:
    """The fields of kafka-python's ConsumerRecord that the server reads."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp: int = 0


def event(record_id: str, **extra: Any) -> bytes:
    return json.dumps({"id": record_id, "text": "a red circle", "image": None, **extra}).encode()


def messages_of(partition: TopicPartition, values: list[bytes | None]) -> list[Message]:
    now = int(time.time() * 1000)
    return [
        Message(partition.topic, partition.partition, offset, value, timestamp=now)
        for offset, value in enumerate(values)
    ]


class FakeConsumer:
    """A consumer of fixed partitions: polls from its positions, records seeks and commits."""

    def __init__(self, log: list[tuple[str, Any]], partitions: dict[TopicPartition, list[Message]]):
        self.log = log
        self.partitions = partitions
        self.positions = dict.fromkeys(partitions, 0)
        self.assigned = set(partitions)
        self.listener: Any = None
        self.settings: dict[str, Any] = {}
        self.on_poll: Callable[[FakeConsumer, int], None] = lambda consumer, polls: None
        self.per_partition: int | None = None  # most messages a poll takes from one partition
        self.polls = 0
        self.polled_at: list[float] = []

    def __call__(self, **settings: Any) -> FakeConsumer:  # the factory
        self.settings = settings
        return self

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Message]]:
        if timeout_ms < 0 or max_records < 1:
            raise ValueError("timeout_ms < 0 or max_records < 1")  # as kafka-python does
        self.polls += 1
        polled: dict[TopicPartition, list[Message]] = {}
        for partition in sorted(self.assigned):
            taken = self.partitions[partition][self.positions[partition] :][:max_records]
            taken = taken[: self.per_partition]
            if taken:
                polled[partition] = taken
                self.positions[partition] += len(taken)
                max_records -= len(taken)
        self.on_poll(self, self.polls)  # a rebalance happens inside the poll
        if polled:
            self.polled_at.append(time.monotonic())
        else:
            time.sleep(min(timeout_ms, 5) / 1000)
        return polled

    def revoke(self, partition: TopicPartition) -> None:
        self.assigned.discard(partition)
        self.listener.on_partitions_revoked({partition})

    def seek(self, partition: TopicPartition, offset: int) -> None:
        assert isinstance(partition, TopicPartition)
        self.log.append(("seek", (partition.partition, offset)))
        self.positions[partition] = offset

    def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        self.log.append(("commit", {p.partition: meta.offset for p, meta in offsets.items()}))

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def highwater(self, partition: TopicPartition) -> int:
        return len(self.partitions[partition])

    def position(self, partition: TopicPartition, timeout_ms: int) -> int:
        return self.positions[partition]

    def close(self, autocommit: bool) -> None:
        assert not autocommit

    def commits(self) -> list[dict[int, int]]:
        return [item for kind, item in self.log if kind == "commit"]


class FakeProducer:
    """Holds every send until `flush`, which acknowledges them, or fails them all while
    `fail_flushes` says so. Like kafka-python's, `send` refuses headers that are not (str,
    bytes) pairs and records over `max_request_size`; the broker refuses those over
    `broker_max_bytes` when flushed."""

    def __init__(self, log: list[tuple[str, Any]]) -> None:
        self.log = log
        self.held: list[tuple[KafkaFuture, dict[str, Any]]] = []
        self.acked: list[dict[str, Any]] = []
        self.fail_flushes: list[bool] = []
        self.max_request_size = 1 << 20
        self.broker_max_bytes: int | None = None

    def __call__(self, **settings: Any) -> FakeProducer:
        self.max_request_size = settings["max_request_size"]
        return self

    def send(self, topic: str, key: bytes, value: bytes, headers: Any = None) -> KafkaFuture:
        if not all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers or []):
            raise TypeError("All headers items must be (str, bytes) tuples")
        size = len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers or [])
        if size > self.max_request_size:
            raise MessageSizeTooLargeError(f"The message is {size} bytes")
        future = KafkaFuture()
        if self.broker_max_bytes is not None and size > self.broker_max_bytes:
            self.log.append(("send", topic))
            return future.failure(MessageSizeTooLargeError("refused by the broker"))
        self.held.append((future, {"topic": topic, "key": key, "value": value, "headers": headers}))
        self.log.append(("send", topic))
        return future

    def flush(self) -> None:
        fail = self.fail_flushes.pop(0) if self.fail_flushes else False
        for future, record in self.held:
            if fail:
                future.failure(KafkaTimeoutError("no ack"))
            else:
                future.success(None)
                self.acked.append(record)
        self.held = []
        self.log.append(("flush", fail))

    def close(self, timeout: float) -> None:
        pass

    def ids(self, topic: str = "mmops.predictions") -> list[str]:
        return [json.loads(r["value"])["id"] for r in self.acked if r["topic"] == topic]


class FakePredictor:
    """Predictor's contract: one result per record, an error result for text 'unreadable';
    `hook` sees each batch's ids first (on the worker thread)."""

    def __init__(self, version: str, hook: Callable[[list[str]], None] | None = None):
        self.identity = SimpleNamespace(name="fake", version=version)
        self.backend = "fake"
        self.references = None  # exported without reference embeddings: drift is not watched
        self.batches: list[list[str]] = []
        self.hook = hook or (lambda ids: None)
        self._lock = threading.Lock()

    def predict_batch(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with self._lock:
            self.batches.append([r["id"] for r in records])
        self.hook([r["id"] for r in records])
        if any(r["text"] == "explode" for r in records):
            raise RuntimeError("the model blew up")  # fails the whole batch, as a runner would
        return [
            {"id": r["id"], "error": "text: unreadable", "reason": "invalid_record"}
            if r["text"] == "unreadable"
            else {
                "id": r["id"],
                "label": "red",
                "scores": {"red": 1.0},
                "model": "fake",
                "version": self.identity.version,
            }
            for r in records
        ]


class FakeModels(ModelSource):
    """A ModelSource whose versions are handed in: `first` at load, `pending` to swap to."""

    def __init__(self, predictor: FakePredictor) -> None:
        super().__init__("models:/fake@champion", PredictConfig(threads=1), 3600.0)
        self.first = predictor

    def load(self, stop: Any = None, beat: Any = None) -> Any:
        self.current = self.first  # type: ignore[assignment]
        return self.current

    @property
    def pending(self) -> Any:
        return self._pending

    @pending.setter
    def pending(self, predictor: FakePredictor | None) -> None:
        with self._lock:
            self._pending = predictor  # type: ignore[assignment]


@dataclass
class Rig:
    server: StreamServer
    consumer: FakeConsumer
    producer: FakeProducer
    models: FakeModels
    log: list[tuple[str, Any]]

    def run(self, max_events: int, timeout: float = 5.0) -> ServeStats:
        """Serve until `max_events` events are committed, failing the test if it takes long."""
        done: list[ServeStats] = []
        thread = threading.Thread(target=lambda: done.append(self.server.run(max_events)))
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            self.server.stop()
            thread.join(5)
            pytest.fail(f"not {max_events} events served in {timeout} s: {self.server.stats}")
        assert done, "the server crashed"
        return done[0]


def rig(
    partitions: dict[TopicPartition, list[Message]],
    predictor: FakePredictor | None = None,
    **stream: Any,
) -> Rig:
    settings = {"max_batch": 4, "max_wait_ms": 10, "workers": 1, **stream}
    overrides = [f"stream.{key}={value}" for key, value in settings.items()]
    params: Params = load_params(None, [f"stream.input_topic={TOPIC}", *overrides])
    log: list[tuple[str, Any]] = []
    consumer, producer = FakeConsumer(log, partitions), FakeProducer(log)
    models = FakeModels(predictor or FakePredictor("1"))
    server = StreamServer(
        params,
        kafka={},
        models=models,  # type: ignore[arg-type]
        consumer_factory=consumer,
        producer_factory=producer,
    )
    return Rig(server, consumer, producer, models, log)


def ids(count: int, prefix: str = "e") -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


# The pure bookkeeping, on a clock the test moves.


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def done_future() -> Future[Served]:
    future: Future[Served] = Future()
    future.set_result(Served([], []))
    return future


def test_a_batch_closes_when_it_holds_max_batch_messages() -> None:
    batches = Batches(max_batch=3, max_wait_ms=1000, workers=1, clock=Clock())
    batches.add(["a", "b"])
    assert not batches.closed() and batches.room == 1
    batches.add(["c"])
    assert batches.closed() and batches.full and batches.can_dispatch()


def test_a_batch_closes_max_wait_ms_after_its_first_message() -> None:
    clock = Clock()
    batches = Batches(max_batch=10, max_wait_ms=500, workers=1, clock=clock)
    assert batches.poll_timeout_ms() == 200  # nothing open: wait for data
    batches.add(["a"])
    clock.now += 0.25
    batches.add(["b"])  # a later message does not move the deadline
    assert not batches.closed()
    assert batches.poll_timeout_ms() == 250  # the poll returns when the batch closes
    clock.now += 0.25
    assert batches.closed() and batches.can_dispatch()


def test_a_closed_batch_waits_for_a_free_worker() -> None:
    batches = Batches(max_batch=1, max_wait_ms=0, workers=1, clock=Clock())
    running: Future[Served] = Future()
    batches.add(["a"])
    assert batches.dispatch(lambda batch: running) == ["a"]
    batches.add(["b"])
    assert batches.closed() and not batches.can_dispatch()
    assert batches.poll_timeout_ms() == 5  # come back soon to send the batch in flight
    running.set_result(Served([], []))
    assert batches.can_dispatch()


def test_predicted_batches_leave_in_the_order_they_closed() -> None:
    batches = Batches(max_batch=1, max_wait_ms=0, workers=2, clock=Clock())
    first: Future[Served] = Future()
    for message, job in (("a", first), ("b", done_future())):
        batches.add([message])
        batches.dispatch(lambda batch, job=job: job)
    assert batches.next_predicted() is None  # the younger one is done, the older is not
    first.set_result(Served([], []))
    flight = batches.next_predicted()
    assert flight is not None and flight.batch == ["a"]
    batches.sent()
    flight = batches.next_predicted()
    assert flight is not None and flight.batch == ["b"]


def test_forgetting_drops_every_unsent_batch_oldest_first() -> None:
    batches = Batches(max_batch=2, max_wait_ms=0, workers=2, clock=Clock())
    waiting: Future[Served] = Future()
    batches.add(["a", "b"])
    batches.dispatch(lambda batch: waiting)
    batches.add(["c"])
    assert batches.forget() == ["a", "b", "c"]
    assert batches.idle and waiting.cancelled()


def test_a_rewind_goes_to_each_assigned_partitions_first_message() -> None:
    ms = [*messages_of(P1, [b""] * 5)[2:], *messages_of(P0, [b""] * 9)[6:]]
    assert rewind_offsets(ms, {P0, P1}) == {(TOPIC, 1): 2, (TOPIC, 0): 6}
    assert rewind_offsets(ms, {P0}) == {(TOPIC, 0): 6}  # a revoked one is its new owner's


def test_a_commit_covers_each_assigned_partition_past_its_last_message() -> None:
    batch = [*messages_of(P0, [b""] * 3), *messages_of(P1, [b""] * 2)]
    assert commit_offsets(batch, {P0, P1}) == {(TOPIC, 0): 3, (TOPIC, 1): 2}
    assert commit_offsets(batch, {P1}) == {(TOPIC, 1): 2}


# The server, on fake clients.


def test_the_server_uses_the_injected_clients_with_its_settings() -> None:
    r = rig({P0: messages_of(P0, [event(i) for i in ids(2)])})
    r.run(2)
    assert r.consumer.settings["enable_auto_commit"] is False
    assert r.consumer.settings["max_poll_records"] == 4
    assert r.producer.ids() == ids(2)


def test_the_server_closes_batches_at_max_batch() -> None:
    r = rig({P0: messages_of(P0, [event(i) for i in ids(10)])}, max_wait_ms=5000)
    stats = r.run(8, timeout=2)  # a batch waiting for max_wait_ms would time out
    assert r.models.first.batches == [ids(10)[:4], ids(10)[4:8]]
    assert stats.batches == 2 and stats.events == 8


def test_the_server_closes_a_short_batch_after_max_wait_ms() -> None:
    r = rig({P0: messages_of(P0, [event(i) for i in ids(3)])}, max_batch=16, max_wait_ms=40)
    predicted_at: list[float] = []
    r.models.first.hook = lambda ids: predicted_at.append(time.monotonic())
    stats = r.run(3)
    assert r.models.first.batches == [ids(3)]
    assert stats.batches == 1
    waited = predicted_at[0] - r.consumer.polled_at[0]
    assert 0.035 <= waited < 1.0


def test_predictions_keep_input_order_when_a_later_batch_finishes_first() -> None:
    second_done = threading.Event()

    def first_batch_waits(batch: list[str]) -> None:
        if batch[0] == "e0":
            assert second_done.wait(2), "the second batch was not predicted alongside"
        else:
            second_done.set()

    r = rig(
        {P0: messages_of(P0, [event(i) for i in ids(8)])},
        FakePredictor("1", first_batch_waits),
        workers=2,
    )
    r.run(8)
    assert r.producer.ids() == ids(8)
    assert r.consumer.commits() == [{0: 4}, {0: 8}]


def test_a_batch_is_committed_only_after_all_its_sends_are_acknowledged() -> None:
    r = rig({P0: messages_of(P0, [event(i) for i in ids(8)])}, workers=2)
    r.run(8)
    # Each batch: its sends, the flush that acknowledges them, its commit; then the next
    # batch. So at most one batch is ever sent and not committed.
    kinds = [kind for kind, _ in r.log if kind != "seek"]
    assert kinds == ["send"] * 4 + ["flush", "commit"] + ["send"] * 4 + ["flush", "commit"]
    assert r.consumer.commits() == [{0: 4}, {0: 8}]


def test_a_failed_send_is_sent_again_alone_before_its_batch_is_committed() -> None:
    r = rig(
        {
            P0: messages_of(P0, [event(i) for i in ids(6, "a")]),
            P1: messages_of(P1, [event(i) for i in ids(6, "b")]),
        }
    )
    r.producer.fail_flushes = [False, True]  # the second batch (a4 a5 b0 b1) is not acked
    stats = r.run(12)
    failed = r.log.index(("flush", True))
    before, after = r.log[:failed], r.log[failed + 1 :]
    assert [item for kind, item in before if kind == "commit"] == [{0: 4}]
    # Only the failed sends again, then the commit: no batch read, predicted or sent twice.
    assert [kind for kind, _ in after[:6]] == ["send"] * 4 + ["flush", "commit"]
    assert not [kind for kind, _ in r.log if kind == "seek"]
    assert r.consumer.commits() == [{0: 4}, {0: 6, 1: 2}, {1: 6}]
    assert r.producer.ids() == ids(6, "a") + ids(6, "b")  # the acknowledged ones, once each
    assert stats.retries == 1 and stats.events == 12


def test_a_send_failing_until_stopped_commits_nothing_and_rewinds() -> None:
    r = rig({P0: messages_of(P0, [event(i) for i in ids(4)])})
    r.producer.fail_flushes = [True] * 1000
    thread = threading.Thread(target=r.server.run, args=(4,))
    thread.start()
    deadline = time.monotonic() + 5
    while r.server.stats.retries < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    r.server.stop()
    thread.join(10)
    assert not thread.is_alive() and r.server.stats.retries >= 2
    assert r.consumer.commits() == [] and r.producer.ids() == []
    assert ("seek", (0, 0)) in r.log  # read again from the first unsent offset


def two_partitions(**stream: Any) -> Rig:
    r = rig(
        {
            P0: messages_of(P0, [event(i) for i in ids(6, "a")]),
            P1: messages_of(P1, [event(i) for i in ids(6, "b")]),
        },
        **stream,
    )
    r.consumer.per_partition = 2  # each poll: two from each partition
    return r


def test_a_revocation_during_a_poll_rewinds_the_messages_it_returned() -> None:
    r = two_partitions()

    def revoke_in_the_first_poll(consumer: FakeConsumer, polls: int) -> None:
        if polls == 1:  # the poll returns a0 a1 b0 b1 and has moved past them
            consumer.revoke(P1)

    r.consumer.on_poll = revoke_in_the_first_poll
    stats = r.run(6)
    assert [item for kind, item in r.log if kind == "seek"] == [(0, 0)]
    assert r.producer.ids() == ids(6, "a")  # the revoked partition is left to its new owner
    assert r.consumer.commits()[-1] == {0: 6}
    assert all(1 not in commit for commit in r.consumer.commits())
    assert stats.events == 6


def test_a_revocation_drops_the_batches_in_flight_and_rewinds_to_their_start() -> None:
    revoked = threading.Event()

    def first_batch_outlasts_the_poll(batch: list[str]) -> None:
        if batch[0] == "a0":
            assert revoked.wait(2)

    r = two_partitions()
    r.models.first.hook = first_batch_outlasts_the_poll

    def revoke_in_the_second_poll(consumer: FakeConsumer, polls: int) -> None:
        if polls == 2:  # batch a0 a1 b0 b1 is being predicted; a2 a3 b2 b3 were just polled
            consumer.revoke(P1)
            revoked.set()

    r.consumer.on_poll = revoke_in_the_second_poll
    stats = r.run(6)
    # Both batches were dropped unsent; the kept partition is read again from its start, the
    # revoked one is left to its new owner.
    assert [item for kind, item in r.log if kind == "seek"] == [(0, 0)]
    assert r.producer.ids() == ids(6, "a")
    assert r.consumer.commits()[-1] == {0: 6}
    assert all(1 not in commit for commit in r.consumer.commits())
    assert stats.events == 6


def test_bad_events_go_to_the_dead_letter_topic_and_the_rest_of_the_batch_is_predicted() -> None:
    values = [
        event("e0"),
        b"{not json",
        json.dumps({"text": "no id", "image": None}).encode(),
        event("e3", text="unreadable"),
        event("e4"),
    ]
    messages = messages_of(P0, values)
    messages[1].headers = [("trace", b"t-1")]
    messages[1].key = b"k-1"
    r = rig({P0: messages}, max_batch=8)
    stats = r.run(5)
    assert r.models.first.batches == [["e0", "e3", "e4"]]
    assert r.producer.ids() == ["e0", "e4"]
    dead = [rec for rec in r.producer.acked if rec["topic"] == "mmops.events.dlq"]
    assert [rec["value"] for rec in dead] == [values[1], values[2], values[3]]
    headers = dict(dead[0]["headers"])
    assert dead[0]["key"] == b"k-1" and headers["trace"] == b"t-1"
    assert headers["mmops.error.reason"] == b"not_json"
    assert headers["mmops.source.offset"] == b"1"
    assert [dict(rec["headers"])["mmops.error.reason"] for rec in dead[1:]] == [
        b"missing_field",
        b"invalid_record",
    ]
    assert (stats.batches, stats.predicted, stats.dead_letters) == (1, 2, 3)
    assert r.consumer.commits() == [{0: 5}]


def test_a_new_champion_serves_only_batches_that_start_after_the_ones_in_flight() -> None:
    second_started = threading.Event()
    new = FakePredictor("2")
    r = rig({P0: messages_of(P0, [event(i) for i in ids(12)])}, workers=2)

    def champion_arrives_mid_flight(batch: list[str]) -> None:
        if batch[0] == "e0":
            assert second_started.wait(2)
        elif batch[0] == "e4":
            r.models.pending = new  # loaded while batches 1 and 2 are being predicted
            second_started.set()

    r.models.first.hook = champion_arrives_mid_flight
    stats = r.run(12)
    assert r.models.first.batches == [ids(12)[:4], ids(12)[4:8]]  # both finished on version 1
    assert new.batches == [ids(12)[8:]]
    versions = [json.loads(rec["value"])["model"]["version"] for rec in r.producer.acked]
    assert versions == ["1"] * 8 + ["2"] * 4
    assert stats.versions == ["1", "2"]
    assert r.server.metrics.registry.get_sample_value("mmops_stream_model_swaps_total") == 1


# One event never stops, stalls or crash-loops the consumer (issue 17).


def dead_letters(r: Rig) -> list[dict[str, Any]]:
    return [rec for rec in r.producer.acked if rec["topic"] == "mmops.events.dlq"]


def reasons(r: Rig) -> list[str]:
    return [dict(rec["headers"])["mmops.error.reason"].decode() for rec in dead_letters(r)]


def nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = {"a": value}
    return value


def test_an_event_whose_prediction_cannot_be_serialised_is_dead_lettered() -> None:
    # Seen against a real broker: parsed, predicted, then orjson refuses 300 levels of nesting.
    values = [event("e0"), event("e1", extra=nested(300)), event("e2")]
    r = rig({P0: messages_of(P0, values)}, max_batch=8)
    stats = r.run(3)
    assert r.producer.ids() == ["e0", "e2"]
    assert reasons(r) == ["unserialisable"]
    [letter] = dead_letters(r)
    assert letter["value"] == values[1]
    assert b"Recursion" in dict(letter["headers"])["mmops.error.message"]
    assert (stats.predicted, stats.dead_letters) == (2, 1)
    assert r.consumer.commits() == [{0: 3}]


def test_a_batch_the_predictor_fails_as_a_whole_is_split_down_to_the_bad_event() -> None:
    values = [event(i) for i in ids(8)]
    values[5] = event("e5", text="explode")
    r = rig({P0: messages_of(P0, values)}, max_batch=8)
    stats = r.run(8)
    assert r.producer.ids() == [i for i in ids(8) if i != "e5"]
    assert reasons(r) == ["predict_failed"]
    assert (
        b"RuntimeError: the model blew up"
        in dict(dead_letters(r)[0]["headers"])["mmops.error.message"]
    )
    # Halves, then quarters: each good record is predicted in a batch that succeeds.
    assert ["e5"] in r.models.first.batches
    assert (stats.predicted, stats.dead_letters, stats.retries) == (7, 1, 0)


def test_a_dead_letter_with_a_null_or_odd_header_is_sent_with_valid_headers() -> None:
    messages = messages_of(P0, [b"{not json", event("e1")])
    messages[0].headers = [("trace", None), ("raw", b"x"), ("mmops.error.reason", b"forged")]
    r = rig({P0: messages})
    stats = r.run(2)
    [letter] = dead_letters(r)
    headers = dict(letter["headers"])
    assert headers["trace"] == b"" and headers["raw"] == b"x"
    assert headers["mmops.error.reason"] == b"not_json"
    assert r.producer.ids() == ["e1"] and stats.retries == 0


def test_an_oversized_event_is_dead_lettered_as_a_small_record_saying_where_it_is() -> None:
    huge = b'{"id": "big", "text": "' + b"x" * 300_000 + b'", "image": null}'
    messages = messages_of(P0, [huge, event("e1")])
    messages[0].key = b"k" * 5000
    r = rig({P0: messages}, max_event_bytes=100_000)
    stats = r.run(2)
    [letter] = dead_letters(r)
    headers = dict(letter["headers"])
    assert headers["mmops.error.reason"] == b"event_too_large"
    assert letter["value"] == huge[:1024]
    assert headers["mmops.value.truncated"] == str(len(huge)).encode()
    assert letter["key"] == b"k" * 1024 and headers["mmops.key.truncated"] == b"5000"
    assert (headers["mmops.source.topic"], headers["mmops.source.offset"]) == (TOPIC.encode(), b"0")
    assert r.producer.ids() == ["e1"] and stats.retries == 0


def test_an_id_over_max_id_chars_is_dead_lettered() -> None:
    r = rig({P0: messages_of(P0, [event("x" * 65), event("e1")])}, max_id_chars=64)
    r.run(2)
    assert reasons(r) == ["id_too_long"]
    assert r.producer.ids() == ["e1"]


def test_a_prediction_too_large_to_send_is_dead_lettered_not_retried_forever() -> None:
    # An id of 600 kB: key plus value exceed the producer's 1 MiB max_request_size.
    values = [event("y" * 600_000), event("e1")]
    r = rig({P0: messages_of(P0, values)}, max_id_chars=10**6, max_event_bytes=700_000)
    stats = r.run(2)
    assert r.producer.ids() == ["e1"]
    [letter] = dead_letters(r)
    headers = dict(letter["headers"])
    assert headers["mmops.error.reason"] == b"unsendable"
    assert b"MessageSizeTooLargeError" in headers["mmops.error.message"]
    assert len(letter["value"]) == 1024  # a prefix: the dead letter itself must fit
    assert (stats.predicted, stats.dead_letters, stats.retries) == (1, 1, 0)
    assert r.consumer.commits() == [{0: 2}]


def test_records_the_broker_refuses_for_good_are_dead_lettered_in_their_place() -> None:
    values = [event("e0", note="n" * 5000), b"[" + b"1," * 3000 + b"1]", event("e2")]
    r = rig({P0: messages_of(P0, values)})
    r.producer.broker_max_bytes = 4000  # the broker's max.message.bytes, below the client's
    stats = r.run(3)
    assert r.producer.ids() == ["e2"]
    letters = dead_letters(r)
    assert [dict(rec["headers"])["mmops.error.reason"] for rec in letters] == [
        b"unsendable",
        b"not_object",  # the dead letter keeps its reason, now as a small record
    ]
    assert all(len(rec["value"]) <= 1024 for rec in letters)
    assert (stats.predicted, stats.dead_letters, stats.retries) == (1, 2, 0)
