"""The consumer's defences, on in-memory fakes: byte-bounded batches, liveness from the loop's
progress, a broken champion falling back to the last good version, records with non-UTF-8
header keys (tests/integration/test_stream.py has the real broker)."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from test_stream_server import (
    P0,
    Clock,
    FakePredictor,
    Message,
    event,
    ids,
    messages_of,
    reasons,
    rig,
)

from mmops.config import PredictConfig
from mmops.serving.champion import ModelSource
from mmops.stream.batching import Batches
from mmops.stream.headers import ESCAPED_HEADER, tolerate_header_keys
from mmops.stream.health import Liveness
from mmops.stream.metrics import StreamMetrics
from mmops.stream.outputs import predict_messages


def sized(*sizes: int) -> list[Message]:
    return [Message("t", 0, offset, b"x" * size) for offset, size in enumerate(sizes)]


def test_a_batch_closes_at_max_bytes_and_the_rest_opens_the_next() -> None:
    batches = Batches(max_batch=10, max_wait_ms=1000, workers=2, clock=Clock(), max_bytes=100)
    batches.add(sized(40, 40, 40, 30))
    assert [len(m.value) for m in batches.open] == [40, 40]
    assert batches.closed() and batches.full and batches.room == 0
    batches.dispatch(lambda batch: Future())
    assert [len(m.value) for m in batches.open] == [40, 30]  # the waiting ones, in order
    assert not batches.full and batches.room == 8


def test_one_event_over_max_bytes_is_a_batch_of_its_own() -> None:
    batches = Batches(max_batch=10, max_wait_ms=1000, workers=2, clock=Clock(), max_bytes=100)
    batches.add(sized(10, 500, 10))
    assert [len(m.value) for m in batches.open] == [10]
    batches.dispatch(lambda batch: Future())
    assert [len(m.value) for m in batches.open] == [500]
    batches.dispatch(lambda batch: Future())
    assert [len(m.value) for m in batches.open] == [10]


def test_forgetting_returns_the_messages_waiting_past_the_byte_limit_too() -> None:
    batches = Batches(max_batch=10, max_wait_ms=1000, workers=2, clock=Clock(), max_bytes=100)
    batches.add(sized(60, 60, 60))
    assert [m.offset for m in batches.forget()] == [0, 1, 2]
    assert batches.idle and not batches.waiting


def test_the_server_never_predicts_a_batch_over_max_batch_bytes() -> None:
    values = [event(i, pad="x" * 300) for i in ids(12)]
    predictor = FakePredictor("1")
    r = rig({P0: messages_of(P0, values)}, predictor, max_batch_bytes=1000, max_batch=64)
    r.run(12)
    assert max(len(batch) for batch in predictor.batches) == 2  # ~370 bytes each
    assert r.producer.ids() == ids(12)


def test_liveness_fails_when_the_loop_stops_beating_or_a_prediction_hangs() -> None:
    clock = Clock()
    liveness = Liveness(10.0, clock)
    clock.now += 11
    assert liveness.problem() is None  # still loading the model: a longer grace
    clock.now += 100
    assert "still starting" in str(liveness.problem())
    liveness.start()
    assert liveness.problem() is None
    clock.now += 11
    assert "serving loop stuck" in str(liveness.problem())
    liveness.beat()
    liveness.predicting(1)
    clock.now += 5
    liveness.beat()
    assert liveness.problem() is None
    clock.now += 6
    liveness.beat()
    assert "prediction has run" in str(liveness.problem())
    liveness.predicted(1)
    assert liveness.problem() is None


def test_healthz_answers_503_for_a_stuck_prediction_and_metrics_stay_served() -> None:
    release = threading.Event()
    predictor = FakePredictor("1", hook=lambda batch: release.wait(20))
    r = rig({P0: messages_of(P0, [event(i) for i in ids(2)])}, predictor, liveness_timeout_s=1)
    r.server.metrics.serve(0, r.server.liveness)
    port = r.server.metrics._server.server_port
    thread = threading.Thread(target=r.server.run, args=(2,))
    thread.start()
    try:
        assert eventually(lambda: status(port, "/healthz") == 503)
        assert status(port, "/metrics") == 200
        release.set()
        assert eventually(lambda: r.producer.ids() == ids(2))
    finally:
        release.set()
        thread.join(10)
        r.server.metrics.close()
    assert r.server.liveness.problem() is None


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


class BrokenPredictor(FakePredictor):
    """A version that fails on every record (a bad export, a missing operator)."""

    def predict_batch(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.batches.append([r["id"] for r in records])
        raise RuntimeError("the new model cannot run")


def failures(r: Any, stage: str, version: str) -> float | None:
    return r.server.metrics.registry.get_sample_value(
        "mmops_stream_model_failures_total", {"stage": stage, "version": version}
    )


def test_a_champion_that_fails_to_predict_falls_back_to_the_last_good_version() -> None:
    good, broken = FakePredictor("1"), BrokenPredictor("2")
    r = rig({P0: messages_of(P0, [event(i) for i in ids(12)])}, good)

    def swap_after_first_batch(consumer: Any, polls: int) -> None:
        if good.batches and r.models.pending is None and not broken.batches:
            r.models.pending = broken

    r.consumer.on_poll = swap_after_first_batch
    stats = r.run(12)
    assert r.producer.ids() == ids(12) and not reasons(r)  # nothing lost, nothing dead-lettered
    assert broken.batches and r.models.current is good
    assert "2" in r.models._rejected and failures(r, "predict", "2") == 1
    assert stats.versions[-1] == "1"


def test_events_every_version_fails_are_dead_lettered_and_the_version_kept() -> None:
    good, new = FakePredictor("1"), FakePredictor("2")
    values = [event(i) for i in ids(4)] + [event(i, text="explode") for i in ids(4, "x")]
    r = rig({P0: messages_of(P0, values)}, good)
    r.consumer.on_poll = lambda consumer, polls: (
        setattr(r.models, "pending", new) if good.batches and not new.batches else None
    )
    r.run(8)
    assert reasons(r) == ["predict_failed"] * 4
    assert r.models.current is new and not r.models._rejected


class FlakyModels(ModelSource):
    """Follows an alias whose new version fails to load; counts the tries."""

    def __init__(self) -> None:
        super().__init__("models:/m@champion", PredictConfig(), poll_s=0.02)
        self.tries = 0
        self.failed: list[tuple[str, str]] = []
        self.on_failure = lambda stage, version: self.failed.append((stage, version))

    def _resolve(self) -> str:
        return "2" if self.current is not None else "1"

    def _load(self, version: str) -> Any:
        if version == "2":
            self.tries += 1
            raise OSError("artifact missing")
        return FakePredictor(version)


def test_a_champion_that_fails_to_load_is_retried_with_backoff_and_the_old_one_serves() -> None:
    models = FlakyModels()
    models.load()
    time.sleep(0.7)  # polls every 20 ms: 35 tries without backoff
    models.close()
    assert models.current is not None and models.current.identity.version == "1"
    assert 2 <= models.tries <= 6 and models.swap() is None
    assert set(models.failed) == {("load", "2")}


def test_a_record_with_a_non_utf8_header_key_is_read_and_dead_lettered() -> None:
    class RawKey(str):
        def encode(self, *args: Any, **kwargs: Any) -> bytes:
            return b"\xff\xfe"

    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
    builder.append(0, 1, None, event("a"), [("trace", b"1")])
    builder.append(1, 2, None, event("b"), [(RawKey("k"), b"2")])
    builder.append(2, 3, None, event("c"), [])
    assert tolerate_header_keys()
    records = list(DefaultRecordBatch(bytes(builder.build())))
    assert [r.offset for r in records] == [0, 1, 2]  # the good ones around it are kept
    assert records[1].headers == [("\\xff\\xfe", b"2"), (ESCAPED_HEADER, b"0")]
    batch = [Message("t", 0, r.offset, r.value, headers=r.headers) for r in records]
    served = predict_messages(FakePredictor("1"), batch, 1 << 20)  # type: ignore[arg-type]
    assert [m.offset for m, _, _ in served.predictions] == [0, 2]
    assert [(m.offset, reason) for m, reason, _ in served.dead] == [(1, "bad_header_key")]


def test_metrics_serve_prometheus_text_without_liveness() -> None:
    metrics = StreamMetrics()
    metrics.serve(0)
    try:
        port = metrics._server.server_port
        assert status(port, "/metrics") == 200
    finally:
        metrics.close()


def test_a_huge_max_batch_bytes_still_makes_a_valid_fetch_request() -> None:
    from mmops.config import load_params
    from mmops.stream.clients import MAX_FETCH_BYTES, consumer_settings

    cfg = load_params(None, ["stream.max_batch_bytes=10000000000"]).stream
    assert consumer_settings(cfg)["fetch_max_bytes"] == MAX_FETCH_BYTES  # an int32 on the wire
