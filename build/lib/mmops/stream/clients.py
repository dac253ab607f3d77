"""The consumer's Kafka clients: their settings from `stream`, a connection that waits for the
brokers, a supervisor that rebuilds a client stuck in a state it cannot leave, and the group
listener that tells the serving loop about rebalances."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from mmops.config import StreamConfig
from mmops.serving.logs import log_data
from mmops.stream.headers import tolerate_header_keys
from mmops.stream.record_batches import tolerate_undecodable_batches
from mmops.stream.settings import message_bytes

log = logging.getLogger(__name__)

# Kafka's fetch request carries its byte limit as a signed 32-bit integer.
MAX_FETCH_BYTES = 2**31 - 1
RECONNECT_BACKOFF_MAX_MS = 2000
MAX_CONNECT_BACKOFF_S = 5.0


def client_factories(
    consumer_factory: Callable[..., Any] | None, producer_factory: Callable[..., Any] | None
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The given factories, else kafka-python's KafkaConsumer and KafkaProducer."""
    if consumer_factory is not None and producer_factory is not None:
        return consumer_factory, producer_factory
    from kafka import KafkaConsumer, KafkaProducer

    return consumer_factory or KafkaConsumer, producer_factory or KafkaProducer


def timeout_settings(cfg: StreamConfig) -> dict[str, Any]:
    """Deadlines both clients share: a request, and the wait between reconnects to a broker."""
    return {
        "request_timeout_ms": int(cfg.client_timeout_s * 1000),
        # The default 30 s cap would leave a returned broker unused for up to 30 s.
        "reconnect_backoff_max_ms": RECONNECT_BACKOFF_MAX_MS,
    }


def producer_settings(cfg: StreamConfig) -> dict[str, Any]:
    timeout_ms = int(cfg.client_timeout_s * 1000)
    return {
        **timeout_settings(cfg),
        "linger_ms": 5,
        # A dead letter carries its event's bytes, up to max_event_bytes: larger than the
        # clients' 1 MiB default, which would refuse it and stall the partition.
        "max_request_size": message_bytes(cfg),
        # send() blocks for metadata and flush() for acks at most this long (defaults 60 and
        # 120 s): the loop gets back in time to beat, count the failure and rebuild.
        "max_block_ms": timeout_ms,
        "delivery_timeout_ms": 2 * timeout_ms + 5,
    }


def consumer_settings(cfg: StreamConfig) -> dict[str, Any]:
    room = message_bytes(cfg)
    return {
        **timeout_settings(cfg),
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


def producer_fault(producer: Any) -> BaseException | None:
    """The fatal error a kafka-python producer is stuck in, or None.

    An idempotent producer whose producer id the broker lost (a restarted broker, an expired
    id) turns fatal and fails every later send without trying: only a new producer recovers.
    """
    manager = getattr(producer, "_transaction_manager", None)
    try:
        if manager is not None and manager.has_fatal_error():
            return manager.last_error or RuntimeError("fatal producer error")
    except AttributeError:  # another client's internals: no fault it can tell
        return None
    return None


def broker_connected(client: Any) -> bool | None:
    """Whether a kafka-python client holds a live connection to any broker; None if unknown."""
    try:
        connections = client._client._manager._conns.values()
        return any(conn.connected for conn in list(connections))
    except AttributeError:
        return None


class StreamClients:
    """The consumer and producer, rebuilt when one is stuck: a producer in a fatal state at
    once, either client after `rebuild_after_s` of failures without a success between them.

    A rebuilt consumer starts from the group's committed offsets, so what was in hand and not
    acknowledged is read again (at least once); the caller forgets it first.
    """

    def __init__(
        self,
        kafka: dict[str, Any],
        cfg: StreamConfig,
        factories: tuple[Callable[..., Any], Callable[..., Any]],
        stop: threading.Event,
        revoked: threading.Event,
        beat: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kafka, self.cfg, self.factories = kafka, cfg, factories
        self.stop, self.revoked, self.beat, self.clock = stop, revoked, beat, clock
        self.rebuild_after_s = cfg.client_timeout_s * 3
        self.consumer: Any = None
        self.producer: Any = None
        self.rebuilds: dict[str, int] = {"consumer": 0, "producer": 0}
        self._failing_since: dict[str, float] = {}

    def connect(self) -> None:
        """A subscribed consumer and a producer, each kept if it is still there (a rebuild drops
        only the stuck one), retrying until the brokers answer or `stop` is set (then the
        client's error is raised)."""
        from kafka.errors import KafkaError

        tolerate_header_keys()
        tolerate_undecodable_batches()
        new_consumer, new_producer = self.factories
        backoff = 1.0
        while True:
            try:
                self.producer = self.producer or new_producer(
                    **self.kafka, **producer_settings(self.cfg)
                )
                if self.consumer is None:
                    consumer = new_consumer(**self.kafka, **consumer_settings(self.cfg))
                    listener = rebalance_listener(self.revoked)
                    consumer.subscribe([self.cfg.input_topic], listener=listener)
                    self.consumer = consumer
                return
            except KafkaError as error:
                if self.stop.is_set():
                    raise
                log.warning(
                    "cannot reach the Kafka brokers; retrying",
                    extra=log_data(
                        servers=self.kafka.get("bootstrap_servers"),
                        error=str(error),
                        retry_in_s=backoff,
                    ),
                )
                self.beat()  # waiting for the brokers is not a stall: a restart would not help
                self.stop.wait(backoff)
                backoff = min(backoff * 2, MAX_CONNECT_BACKOFF_S)

    def succeeded(self, client: str) -> None:
        """`client` ("consumer" or "producer") just worked: its failure streak ends."""
        self._failing_since.pop(client, None)

    def failed(self, client: str, error: BaseException) -> bool:
        """Note a failure of `client`; rebuild it if it is stuck. True when it was rebuilt."""
        since = self._failing_since.setdefault(client, self.clock())
        fault = producer_fault(self.producer) if client == "producer" else None
        if fault is None and self.clock() - since < self.rebuild_after_s:
            return False
        why = fault or error
        if client == "producer":
            self.rebuild_producer(why)
        else:
            self.rebuild_consumer(why)
        return True

    def rebuild_producer(self, why: BaseException) -> None:
        log.warning(
            "producer cannot recover; replacing it",
            extra=log_data(error=f"{type(why).__name__}: {why}"[:1000]),
        )
        old, self.producer = self.producer, None
        _close(old, lambda client: client.close(timeout=0))
        self.rebuilds["producer"] += 1
        self._failing_since.pop("producer", None)
        self.connect()  # keeps the consumer, makes a producer

    def rebuild_consumer(self, why: BaseException) -> None:
        log.warning(
            "consumer keeps failing; replacing it",
            extra=log_data(error=f"{type(why).__name__}: {why}"[:1000]),
        )
        old, self.consumer = self.consumer, None
        _close(old, lambda client: client.close(autocommit=False))
        self.rebuilds["consumer"] += 1
        self._failing_since.pop("consumer", None)
        self.connect()

    def close(self) -> None:
        _close(self.consumer, lambda client: client.close(autocommit=False))
        _close(self.producer, lambda client: client.close(timeout=10))
        self.consumer = self.producer = None


def _close(client: Any, close: Callable[[Any], None]) -> None:
    if client is None:
        return
    try:
        close(client)
    except Exception as error:  # a broken client may fail to close too; it is dropped anyway
        log.debug("closing a client failed: %s", error)


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
