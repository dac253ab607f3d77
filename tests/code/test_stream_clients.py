"""Clients that heal, on in-memory fakes: a producer stuck in a fatal error replaced, a client
failing without pause rebuilt, liveness from acknowledgements, readiness from the model
(tests/faults/test_stream_faults.py kills and pauses the real broker and consumer)."""

from __future__ import annotations

import threading
from typing import Any

from kafka.errors import KafkaTimeoutError
from test_stream_resilience import eventually, status
from test_stream_server import P0, Clock, FakeProducer, event, ids, messages_of, rig

from mmops.config import load_params
from mmops.stream.clients import StreamClients, consumer_settings, producer_fault
from mmops.stream.clients import producer_settings as producer_config
from mmops.stream.health import Liveness, health_app


class FatalState:
    """kafka-python's transaction manager after InitProducerId failed on a restarted broker."""

    last_error = RuntimeError("Unexpected error in InitProducerIdResponse: UnknownError")

    def has_fatal_error(self) -> bool:
        return True


def stuck_producer(log: list[tuple[str, Any]]) -> FakeProducer:
    producer = FakeProducer(log)
    producer.fail_flushes = [True] * 1000
    producer._transaction_manager = FatalState()  # type: ignore[attr-defined]
    return producer


def test_a_producer_in_a_fatal_state_is_replaced_and_the_batch_sent_by_the_new_one() -> None:
    r = rig({P0: messages_of(P0, [event(i) for i in ids(4)])})
    stuck = stuck_producer(r.log)
    made: list[dict[str, Any]] = []

    def new_producer(**settings: Any) -> FakeProducer:
        made.append(settings)
        return stuck if len(made) == 1 else r.producer(**settings)

    consumers: list[dict[str, Any]] = []

    def new_consumer(**settings: Any) -> Any:
        consumers.append(settings)
        return r.consumer(**settings)

    r.server.clients.factories = (new_consumer, new_producer)
    stats = r.run(4)

    assert len(made) == 2  # replaced at the first failed send, not after a timeout
    assert len(consumers) == 1  # the consumer was fine: kept, not joined to the group twice
    assert stuck.acked == [] and r.producer.ids() == ids(4)
    assert r.consumer.commits() == [{0: 4}]  # committed once the new producer's sends were acked
    assert stats.retries == 1
    rebuilds = {"client": "producer"}
    assert r.server.metrics.registry.get_sample_value(
        "mmops_stream_client_rebuilds_total", rebuilds
    ) == (1)


def test_a_client_failing_without_a_success_is_rebuilt_after_three_request_timeouts() -> None:
    cfg = load_params(None, ["stream.client_timeout_s=5"]).stream
    clock, made = Clock(), []

    def factory(**settings: Any) -> Any:
        made.append(settings)
        return FakeProducer([])

    def consumer(**settings: Any) -> Any:
        return type("C", (), {"subscribe": lambda *a, **k: None, "close": lambda *a, **k: None})()

    clients = StreamClients(
        {}, cfg, (consumer, factory), threading.Event(), threading.Event(), lambda: None, clock
    )
    clients.connect()
    error = KafkaTimeoutError("no ack")
    assert not clients.failed("producer", error)
    clock.now += 14
    assert not clients.failed("producer", error)  # 14 s of failures: may yet pass
    clients.succeeded("producer")
    clock.now += 10
    assert not clients.failed("producer", error)  # a success in between: a new streak
    clock.now += 15.5
    assert clients.failed("producer", error) and len(made) == 2
    assert clients.rebuilds == {"consumer": 0, "producer": 1}


def test_a_healthy_producer_has_no_fault_and_an_unknown_client_none() -> None:
    assert producer_fault(FakeProducer([])) is None
    assert "InitProducerId" in str(producer_fault(stuck_producer([])))


def test_the_clients_deadlines_let_the_loop_come_back_well_within_the_liveness_timeout() -> None:
    cfg = load_params(None).stream
    producer, consumer = producer_config(cfg), consumer_settings(cfg)
    # kafka-python's defaults block a send 60 s and a flush 120 s, and reconnect after 30 s.
    assert producer["max_block_ms"] <= cfg.client_timeout_s * 1000
    assert producer["delivery_timeout_ms"] < cfg.liveness_timeout_s * 1000 / 2
    assert producer["reconnect_backoff_max_ms"] == consumer["reconnect_backoff_max_ms"] <= 2000


def test_liveness_fails_when_events_wait_and_none_is_acknowledged() -> None:
    clock = Clock()
    liveness = Liveness(10.0, clock)
    liveness.start()
    clock.now += 100
    liveness.beat()
    assert liveness.problem() is None  # idle: nothing waits, nothing to acknowledge
    liveness.waiting(5)
    assert liveness.problem() is None  # they just arrived
    clock.now += 11
    liveness.beat()  # the loop turns (retrying a broker, say) but serves nothing
    assert "5 events wait and none was acknowledged for 11 s" in str(liveness.problem())
    liveness.acked()
    assert liveness.problem() is None
    assert liveness.since_ack() == 0


def test_readyz_is_503_until_a_model_serves_while_healthz_is_200() -> None:
    from mmops.stream.health import serve_http

    liveness = Liveness(10.0)
    liveness.not_ready = "loading the model"
    server = serve_http(health_app(liveness, lambda env, start: []), 0, "127.0.0.1")
    port = server.server_port
    try:
        assert status(port, "/healthz") == 200 and status(port, "/readyz") == 503
        liveness.start()
        assert eventually(lambda: status(port, "/readyz") == 200)
    finally:
        server.shutdown()
        server.server_close()
