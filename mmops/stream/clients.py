"""The consumer's Kafka clients: their settings from `stream`, a connection that waits for the
brokers, and the group listener that tells the serving loop about rebalances."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from mmops.config import StreamConfig
from mmops.stream.headers import tolerate_header_keys
from mmops.stream.logs import log_data
from mmops.stream.record_batches import tolerate_undecodable_batches
from mmops.stream.settings import message_bytes

log = logging.getLogger(__name__)

# Kafka's fetch request carries its byte limit as a signed 32-bit integer.
MAX_FETCH_BYTES = 2**31 - 1


def client_factories(
    consumer_factory: Callable[..., Any] | None, producer_factory: Callable[..., Any] | None
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The given factories, else kafka-python's KafkaConsumer and KafkaProducer."""
    if consumer_factory is not None and producer_factory is not None:
        return consumer_factory, producer_factory
    from kafka import KafkaConsumer, KafkaProducer

    return consumer_factory or KafkaConsumer, producer_factory or KafkaProducer


def producer_settings(cfg: StreamConfig) -> dict[str, Any]:
    # A dead letter carries its event's bytes, up to max_event_bytes: larger than the clients'
    # 1 MiB default, which would refuse it and stall the partition.
    return {"linger_ms": 5, "max_request_size": message_bytes(cfg)}


def consumer_settings(cfg: StreamConfig) -> dict[str, Any]:
    room = message_bytes(cfg)
    return {
        "group_id": cfg.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": cfg.auto_offset_reset,
        "session_timeout_ms": cfg.session_timeout_ms,
        "heartbeat_interval_ms": max(100, min(3000, cfg.session_timeout_ms // 3)),
        "max_poll_records": cfg.max_batch,
        # The broker answers a fetch when data arrives or after this long; the default 500 ms
        # would add its wait to an idle stream's latency.
        "fetch_max_wait_ms": max(10, cfg.max_wait_ms),
        # A fetch holds about one batch of bytes (a single larger record still comes whole), so
        # what the client buffers stays bounded by bytes, not only by record count.
        "fetch_max_bytes": min(MAX_FETCH_BYTES, max(room, cfg.max_batch_bytes)),
        "max_partition_fetch_bytes": room,
    }


def connect(
    kafka: dict[str, Any],
    cfg: StreamConfig,
    factories: tuple[Callable[..., Any], Callable[..., Any]],
    stop: threading.Event,
    revoked: threading.Event,
    beat: Callable[[], None],
    producer: Any = None,
) -> tuple[Any, Any]:
    """A subscribed consumer and a producer (`producer` if given), retrying until the brokers
    answer or `stop` is set (then the client's error is raised)."""
    from kafka.errors import KafkaError

    tolerate_header_keys()
    tolerate_undecodable_batches()
    new_consumer, new_producer = factories
    backoff = 1.0
    while True:
        try:
            producer = producer or new_producer(**kafka, **producer_settings(cfg))
            consumer = new_consumer(**kafka, **consumer_settings(cfg))
            consumer.subscribe([cfg.input_topic], listener=rebalance_listener(revoked))
            return consumer, producer
        except KafkaError as error:
            if stop.is_set():
                raise
            log.warning(
                "cannot reach the Kafka brokers; retrying",
                extra=log_data(
                    servers=kafka.get("bootstrap_servers"), error=str(error), retry_in_s=backoff
                ),
            )
            beat()  # waiting for the brokers is not a stall: a restart would not help
            stop.wait(backoff)
            backoff = min(backoff * 2, 30.0)


def rebalance_listener(revoked_flag: threading.Event) -> Any:
    """Logs the group's moves (`partitions assigned` tells that this consumer now serves) and
    flags revocations to the serving loop, which then rewinds what it polled and did not send.
    Runs on the client's thread, so it only sets the flag."""
    from kafka import ConsumerRebalanceListener

    class Listener(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked: Any) -> None:
            if revoked:
                revoked_flag.set()
            log.info("partitions revoked", extra=log_data(partitions=sorted(map(str, revoked))))

        def on_partitions_lost(self, lost: Any) -> None:
            if lost:
                revoked_flag.set()
            log.info("partitions lost", extra=log_data(partitions=sorted(map(str, lost))))

        def on_partitions_assigned(self, assigned: Any) -> None:
            log.info("partitions assigned", extra=log_data(partitions=sorted(map(str, assigned))))

    return Listener()
