"""Live predictions from Kafka: micro-batches through the one prediction path, at least once.

A `StreamServer` consumes JSON events in a consumer group, runs each micro-batch through
`Predictor.predict_batch`, produces one prediction per good event and sends every bad one, with
its original bytes, to the dead-letter topic. Offsets are committed only after the broker has
acknowledged everything the batch produced, so a crash loses nothing and repeats at most the
uncommitted batch of each partition.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from mmops.config import Params, PredictConfig, StreamConfig
from mmops.predict import Predictor
from mmops.stack import DEFAULT_BOOTSTRAP

log = logging.getLogger(__name__)

# Environment variable -> kafka-python setting; credentials never live in params.yaml or code.
KAFKA_ENV = {
    "KAFKA_SECURITY_PROTOCOL": "security_protocol",
    "KAFKA_SASL_MECHANISM": "sasl_mechanism",
    "KAFKA_SASL_USERNAME": "sasl_plain_username",
    "KAFKA_SASL_PASSWORD": "sasl_plain_password",
    "KAFKA_SSL_CAFILE": "ssl_cafile",
    "KAFKA_SSL_CERTFILE": "ssl_certfile",
    "KAFKA_SSL_KEYFILE": "ssl_keyfile",
    "KAFKA_SSL_PASSWORD": "ssl_password",
}
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI")
# Event fields the prediction itself writes; an event field of the same name passes through as
# `event_<name>`, so the input's own `ts` survives next to the prediction's.
PREDICTION_FIELDS = ("id", "label", "scores", "model", "latency_ms", "ts")
CONSUMED_FIELDS = ("id", "text", "image")
DEAD_LETTER_HEADER = "mmops."
# Key, headers and record framing on top of an event's value.
EVENT_OVERHEAD_BYTES = 64 * 1024


def message_bytes(cfg: StreamConfig) -> int:
    """The largest record the stream handles: an event of max_event_bytes with its framing."""
    return max(1 << 20, cfg.max_event_bytes + EVENT_OVERHEAD_BYTES)


def topic_configs(cfg: StreamConfig) -> dict[str, str]:
    """Settings for the stream's topics: brokers default to 1 MiB records, events go larger."""
    return {"max.message.bytes": str(message_bytes(cfg))}


class EventError(ValueError):
    """An event that is not a prediction request; `reason` is a short code for metrics."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class DeliveryError(RuntimeError):
    """The broker did not acknowledge a batch's output; its offsets stay uncommitted."""


def kafka_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """kafka-python client settings from KAFKA_BOOTSTRAP_SERVERS and the KAFKA_* security vars."""
    environ = os.environ if environ is None else environ
    servers = environ.get("KAFKA_BOOTSTRAP_SERVERS") or DEFAULT_BOOTSTRAP
    settings: dict[str, Any] = {
        "bootstrap_servers": [s.strip() for s in servers.split(",") if s.strip()],
        "client_id": environ.get("KAFKA_CLIENT_ID") or "mmops",
    }
    for name, key in KAFKA_ENV.items():
        if environ.get(name):
            settings[key] = environ[name]
    protocol = settings.get("security_protocol")
    if protocol is not None and protocol not in SECURITY_PROTOCOLS:
        raise ValueError(
            f"KAFKA_SECURITY_PROTOCOL: must be one of {', '.join(SECURITY_PROTOCOLS)}, "
            f"got {protocol!r}"
        )
    mechanism = settings.get("sasl_mechanism")
    if mechanism is not None and mechanism not in SASL_MECHANISMS:
        raise ValueError(
            f"KAFKA_SASL_MECHANISM: must be one of {', '.join(SASL_MECHANISMS)}, got {mechanism!r}"
        )
    return settings


def decode_event(value: bytes | None, max_bytes: int) -> dict[str, Any]:
    """A prediction request from a message value; EventError names what is wrong with it.

    The contract is a JSON object with `id` (a non-empty string), `text` and `image` (base64);
    `text` or `image` may be null to declare a missing modality, but not absent. The predictor
    checks the rest (types, sizes, pixels from the header, decoding).
    """
    if value is None:
        raise EventError("value: null (a tombstone is not an event)", "null_value")
    if len(value) > max_bytes:
        raise EventError(
            f"value: {len(value)} bytes exceeds stream.max_event_bytes ({max_bytes})",
            "event_too_large",
        )
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise EventError(
            f"value: not UTF-8 ({error.reason} at byte {error.start})", "not_utf8"
        ) from None
    try:
        event = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise EventError(f"value: not JSON ({error.msg} at char {error.pos})", "not_json") from None
    if not isinstance(event, dict):
        raise EventError(f"value: expected a JSON object, got {type(event).__name__}", "not_object")
    record_id = event.get("id")
    if "id" not in event or record_id is None:
        raise EventError("id: missing", "missing_field")
    if not isinstance(record_id, str) or not record_id:
        raise EventError(f"id: expected a non-empty string, got {record_id!r:.40}", "wrong_type")
    for name in ("text", "image"):
        if name not in event:
            raise EventError(f"{name}: missing (null declares a missing modality)", "missing_field")
    if event["image"] is not None and not isinstance(event["image"], str):
        raise EventError(
            f"image: expected base64 text or null, got {type(event['image']).__name__}",
            "wrong_type",
        )
    return event


def prediction_value(
    event: Mapping[str, Any], result: Mapping[str, Any], received: float, now: float
) -> dict[str, Any]:
    """The output message for one predicted event, with the event's extra fields passed through."""
    value: dict[str, Any] = {
        "id": result["id"],
        "label": result["label"],
        "scores": result["scores"],
        "model": {"name": result["model"], "version": result["version"]},
        "latency_ms": round((now - received) * 1000, 3),  # consumer receipt to prediction
        "ts": int(now * 1000),  # epoch milliseconds, like Kafka timestamps
    }
    for key, item in event.items():
        if key not in CONSUMED_FIELDS:
            value[f"event_{key}" if key in PREDICTION_FIELDS else key] = item
    return value


def dead_letter_headers(message: Any, reason: str, error: str) -> list[tuple[str, bytes]]:
    """The original headers plus why the event failed and where it came from."""
    extra = {
        "error.reason": reason,
        "error.message": error,
        "source.topic": message.topic,
        "source.partition": str(message.partition),
        "source.offset": str(message.offset),
        "source.timestamp": str(message.timestamp),
    }
    original = [(k, v) for k, v in (message.headers or []) if not k.startswith(DEAD_LETTER_HEADER)]
    return original + [(DEAD_LETTER_HEADER + k, v.encode()) for k, v in extra.items()]


class StreamMetrics:
    """Prometheus metrics of one consumer, in its own registry (several can share a process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        latency_buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.events = Counter(
            "mmops_stream_events", "Events handled, by outcome", ["outcome"], registry=r
        )
        self.dead_letters = Counter(
            "mmops_stream_dead_letters",
            "Events sent to the dead-letter topic",
            ["reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "mmops_stream_batch_size",
            "Events per micro-batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.end_to_end = Histogram(
            "mmops_stream_end_to_end_seconds",
            "From an event's Kafka timestamp to its prediction acknowledged by the broker",
            buckets=latency_buckets,
            registry=r,
        )
        self.model_latency = Histogram(
            "mmops_stream_model_seconds",
            "One predict_batch call",
            buckets=latency_buckets,
            registry=r,
        )
        self.lag = Gauge(
            "mmops_stream_consumer_lag",
            "Events behind the partition's end",
            ["topic", "partition"],
            registry=r,
        )
        self.model = Gauge(
            "mmops_stream_model_info",
            "1 for the model version being served",
            ["name", "version", "backend"],
            registry=r,
        )
        self.swaps = Counter("mmops_stream_model_swaps", "Champion swaps", registry=r)
        self.errors = Counter(
            "mmops_stream_errors", "Broker and model errors survived", ["kind"], registry=r
        )
        self._server: Any = None

    def serve(self, port: int) -> None:
        """Expose /metrics on `port` (all interfaces, for a scraper in another container)."""
        from prometheus_client import start_http_server

        self._server, _ = start_http_server(port, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def set_model(self, predictor: Predictor) -> None:
        self.model.clear()
        identity = predictor.identity
        self.model.labels(identity.name, identity.version, predictor.backend).set(1)


class ModelSource:
    """The predictor to serve: a pinned model, or an alias re-resolved every `poll_s` seconds.

    A new version is loaded in a background thread and handed over by `swap`, which the consumer
    calls between batches, so each event is served by exactly one version.
    """

    def __init__(
        self, model_ref: str, config: PredictConfig, poll_s: float, follow: bool | None = None
    ) -> None:
        self.model_ref = model_ref
        self.config = config
        self.poll_s = poll_s
        alias = model_ref.startswith("models:/") and "@" in model_ref
        self.follow = alias if follow is None else follow and alias
        self.current: Predictor | None = None
        self._pending: Predictor | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def load(self) -> Predictor:
        """Load the model now (the alias's current version when following)."""
        self.current = (
            self._load(self._resolve())
            if self.follow
            else Predictor.load(self.model_ref, self.config.backend, self.config)
        )
        if self.follow:
            self._thread = threading.Thread(target=self._watch, name="model-watch", daemon=True)
            self._thread.start()
        return self.current

    def swap(self) -> Predictor | None:
        """The newly loaded champion, once, if there is one; it becomes `current`."""
        with self._lock:
            new, self._pending = self._pending, None
        if new is not None:
            self.current = new
        return new

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _resolve(self) -> str:
        from mlflow import MlflowClient

        from mmops.tracking import tracking_uri

        name, alias = self.model_ref.removeprefix("models:/").split("@", 1)
        return str(MlflowClient(tracking_uri()).get_model_version_by_alias(name, alias).version)

    def _load(self, version: str) -> Predictor:
        name = self.model_ref.removeprefix("models:/").split("@", 1)[0]
        return Predictor.load(f"models:/{name}/{version}", self.config.backend, self.config)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                version = self._resolve()
                with self._lock:
                    seen = self._pending or self.current
                if seen is not None and version == seen.identity.version:
                    continue
                predictor = self._load(version)
                with self._lock:
                    self._pending = predictor
                log.info("loaded new champion", extra=_data(version=version))
            except Exception as error:  # keep serving the current model through registry trouble
                log.warning(
                    "champion check failed; still serving the current model",
                    extra=_data(error=f"{type(error).__name__}: {error}"),
                )


@dataclass
class InFlight:
    """A served batch's sends: its offsets are committed once the broker acknowledges them all."""

    batch: list[Any]
    futures: list[Any]
    predicted: list[Any]
    dead: list[tuple[Any, str, str]]


@dataclass
class ServeStats:
    """What one `StreamServer.run` did."""

    events: int = 0
    predicted: int = 0
    dead_letters: int = 0
    batches: int = 0
    retries: int = 0
    versions: list[str] = field(default_factory=list)
    first_event_at: float | None = None
    last_commit_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class StreamServer:
    """A consumer-group member serving predictions; `run` until `stop` (or `max_events`)."""

    def __init__(
        self,
        params: Params,
        model_ref: str | None = None,
        kafka: dict[str, Any] | None = None,
        metrics: StreamMetrics | None = None,
    ) -> None:
        self.cfg: StreamConfig = params.stream
        ref = model_ref or f"models:/{params.tracking.registered_model}@champion"
        self.models = ModelSource(ref, params.predict, self.cfg.model_poll_s)
        self.kafka = kafka if kafka is not None else kafka_settings()
        self.metrics = metrics or StreamMetrics()
        self.stats = ServeStats()
        self._stop = threading.Event()
        self.consumer: Any = None
        self.producer: Any = None

    def stop(self) -> None:
        """Finish the batch in hand, commit it and leave; safe from a signal handler."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self, max_events: int | None = None) -> ServeStats:
        """Serve until stopped, or until `max_events` events have been handled."""
        predictor = self.models.load()
        self.metrics.set_model(predictor)
        self.stats.versions.append(predictor.identity.version)
        log.info(
            "serving",
            extra=_data(
                model=predictor.identity.name,
                version=predictor.identity.version,
                backend=predictor.backend,
                topic=self.cfg.input_topic,
                group=self.cfg.group_id,
                following=self.models.follow,
            ),
        )
        try:
            self._connect()
            backoff = 0.5
            while not self.stopping:
                if max_events is not None and self.stats.events >= max_events:
                    break
                try:
                    self._step()
                    backoff = 0.5
                except Exception as error:
                    from kafka.errors import KafkaError

                    if not isinstance(error, KafkaError | DeliveryError):
                        raise
                    # The broker is away or refused the batch: nothing was committed, so the
                    # batch is read again once it is back.
                    self.metrics.errors.labels(type(error).__name__).inc()
                    self.stats.retries += 1
                    log.warning(
                        "broker error; retrying the batch",
                        extra=_data(error=f"{type(error).__name__}: {error}", retry_in_s=backoff),
                    )
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
        finally:
            self._close()
        return self.stats

    def _connect(self) -> None:
        from kafka import KafkaConsumer, KafkaProducer
        from kafka.errors import KafkaError

        cfg = self.cfg
        backoff = 1.0
        while True:
            try:
                # A dead letter carries its event's bytes, up to max_event_bytes: larger than
                # the clients' 1 MiB default, which would refuse it and stall the partition.
                room = message_bytes(cfg)
                self.producer = self.producer or KafkaProducer(
                    **self.kafka, linger_ms=5, max_request_size=room
                )
                self.consumer = KafkaConsumer(
                    **self.kafka,
                    group_id=cfg.group_id,
                    enable_auto_commit=False,
                    auto_offset_reset=cfg.auto_offset_reset,
                    session_timeout_ms=cfg.session_timeout_ms,
                    heartbeat_interval_ms=max(100, min(3000, cfg.session_timeout_ms // 3)),
                    max_poll_records=cfg.max_batch,
                    # The broker answers a fetch when data arrives or after this long; the
                    # default 500 ms would add its wait to an idle stream's latency.
                    fetch_max_wait_ms=max(10, cfg.max_wait_ms),
                    max_partition_fetch_bytes=room,
                )
                self.consumer.subscribe([cfg.input_topic], listener=_rebalance_log())
                return
            except KafkaError as error:
                if self.stopping:
                    raise
                log.warning(
                    "cannot reach the Kafka brokers; retrying",
                    extra=_data(
                        servers=self.kafka["bootstrap_servers"],
                        error=str(error),
                        retry_in_s=backoff,
                    ),
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _step(self) -> None:
        swapped = self.models.swap()
        if swapped is not None:
            self.metrics.set_model(swapped)
            self.metrics.swaps.inc()
            self.stats.versions.append(swapped.identity.version)
            log.info(
                "swapped to the new champion",
                extra=_data(version=swapped.identity.version, backend=swapped.backend),
            )
        batch = self._collect()
        if not batch:
            return
        self.stats.first_event_at = self.stats.first_event_at or time.time()
        try:
            flight = self._serve(batch)
            # Waiting for the acks here, rather than while the next batch is collected and
            # predicted, measured faster on few cores: the client's network thread then does not
            # compete with the model's threads (bench/stream_throughput.py).
            self._acknowledge(flight)
        except Exception:
            # Nothing unacknowledged is committed: read it all again (duplicates, never gaps).
            self._rewind(batch)
            raise

    def _collect(self) -> list[Any]:
        """Up to max_batch messages, waiting at most max_wait_ms after the first one."""
        cfg, consumer = self.cfg, self.consumer
        batch: list[Any] = []
        deadline: float | None = None
        while len(batch) < cfg.max_batch and not self.stopping:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            timeout = 200 if deadline is None else max(1, int((deadline - now) * 1000))
            try:
                polled = consumer.poll(timeout_ms=timeout, max_records=cfg.max_batch - len(batch))
            except Exception:
                self._rewind(batch)
                raise
            for messages in polled.values():
                batch.extend(messages)
            if batch and deadline is None:
                deadline = now + cfg.max_wait_ms / 1000
            if not batch:
                self._record_lag()
                return batch
        # A rebalance inside poll may have taken partitions away: their new owner reads them.
        assigned = consumer.assignment()
        return [m for m in batch if _partition(m) in assigned]

    def _serve(self, batch: Sequence[Any]) -> InFlight:
        """Predict a batch and send its predictions and dead letters (acks come later)."""
        predictor = self.models.current
        assert predictor is not None
        received = time.time()
        events: list[tuple[Any, dict[str, Any]]] = []
        dead: list[tuple[Any, str, str]] = []
        for message in batch:
            try:
                events.append((message, decode_event(message.value, self.cfg.max_event_bytes)))
            except EventError as error:
                dead.append((message, error.reason, str(error)))
        start = time.perf_counter()
        results = predictor.predict_batch([event for _, event in events])
        self.metrics.model_latency.observe(time.perf_counter() - start)
        now = time.time()
        futures = []
        predicted = []
        for (message, event), result in zip(events, results, strict=True):
            if "error" in result:
                dead.append((message, result.get("reason", "invalid_record"), result["error"]))
                continue
            value = prediction_value(event, result, received, now)
            predicted.append(message)
            futures.append(
                self.producer.send(
                    self.cfg.output_topic,
                    key=value["id"].encode(),
                    value=orjson.dumps(value, default=str),
                )
            )
        for message, reason, error in dead:
            futures.append(
                self.producer.send(
                    self.cfg.dead_letter_topic,
                    key=message.key if message.key is not None or message.value else b"",
                    value=message.value,
                    headers=dead_letter_headers(message, reason, error),
                )
            )
            log.warning(
                "dead letter",
                extra=_data(
                    reason=reason,
                    error=error,
                    topic=message.topic,
                    partition=message.partition,
                    offset=message.offset,
                ),
            )
        return InFlight(list(batch), futures, predicted, dead)

    def _acknowledge(self, flight: InFlight) -> None:
        """Wait for a batch's sends; once all are acknowledged, commit its offsets."""
        self.producer.flush()
        failed = [f.exception for f in flight.futures if not f.is_done or f.failed()]
        if failed:
            raise DeliveryError(f"{len(failed)} of {len(flight.futures)} sends failed: {failed[0]}")
        acked = time.time()
        for message in flight.predicted:
            self.metrics.end_to_end.observe(max(0.0, acked - message.timestamp / 1000))
        for _, reason, _ in flight.dead:
            self.metrics.dead_letters.labels(reason).inc()
        self.metrics.events.labels("predicted").inc(len(flight.predicted))
        self.metrics.events.labels("dead_letter").inc(len(flight.dead))
        self.metrics.batch_size.observe(len(flight.batch))
        self.stats.events += len(flight.batch)
        self.stats.predicted += len(flight.predicted)
        self.stats.dead_letters += len(flight.dead)
        self.stats.batches += 1
        self._commit(flight.batch)

    def _commit(self, batch: Sequence[Any]) -> None:
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        assigned = self.consumer.assignment()
        offsets: dict[Any, Any] = {}
        for message in batch:
            if _partition(message) in assigned:  # a revoked partition's owner re-serves it
                offsets[_partition(message)] = OffsetAndMetadata(message.offset + 1, "", -1)
        try:
            self.consumer.commit(offsets)
        except KafkaError as error:
            # Commits are cumulative: the next one covers this batch. Until then a restart or
            # the partition's next owner may serve it again (same ids), never skip it.
            self.metrics.errors.labels(type(error).__name__).inc()
            log.warning("commit failed", extra=_data(error=str(error)))
            return
        self.stats.last_commit_at = time.time()
        self._record_lag()

    def _rewind(self, batch: Sequence[Any]) -> None:
        first: dict[Any, int] = {}
        for message in batch:
            first.setdefault(_partition(message), message.offset)
        assigned = self.consumer.assignment()
        for partition, offset in first.items():
            if partition in assigned:
                self.consumer.seek(partition, offset)

    def _record_lag(self) -> None:
        for partition in self.consumer.assignment():
            end = self.consumer.highwater(partition)
            if end is None:
                continue
            position = self.consumer.position(partition, timeout_ms=100)
            if position is not None:
                self.metrics.lag.labels(partition.topic, str(partition.partition)).set(
                    max(0, end - position)
                )

    def _close(self) -> None:
        self.models.close()
        if self.consumer is not None:
            self.consumer.close(autocommit=False)
        if self.producer is not None:
            self.producer.close(timeout=10)
        log.info("stopped", extra=_data(**self.stats.to_dict()))


def _rebalance_log() -> Any:
    """Logs the group's moves: `partitions assigned` tells that this consumer now serves."""
    from kafka import ConsumerRebalanceListener

    class Listener(ConsumerRebalanceListener):
        # Nothing is in flight while the consumer polls (each batch is acknowledged and
        # committed before the next poll), so a rebalance has nothing to hand over.
        def on_partitions_revoked(self, revoked: Any) -> None:
            log.info("partitions revoked", extra=_data(partitions=sorted(map(str, revoked))))

        def on_partitions_assigned(self, assigned: Any) -> None:
            log.info("partitions assigned", extra=_data(partitions=sorted(map(str, assigned))))

    return Listener()


def _data(**fields: Any) -> dict[str, Any]:
    """`extra` for a log call: fields the JSON formatter adds to the line."""
    return {"data": fields}


def _partition(message: Any) -> Any:
    from kafka.structs import TopicPartition

    return TopicPartition(message.topic, message.partition)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message and the record's `data`."""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data = getattr(record, "data", None)
        if isinstance(data, Mapping):
            entry.update(data)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def dataset_events(rows: Sequence[Mapping[str, Any]], root: Path | str) -> list[dict[str, Any]]:
    """Contract events from dataset rows: base64 image, text, and the true label as `truth`."""
    events = []
    for row in rows:
        image = row.get("image")
        encoded = None
        if isinstance(image, str) and image:
            encoded = base64.b64encode((Path(root) / image).read_bytes()).decode()
        text = row.get("text")
        events.append(
            {
                "id": str(row["id"]),
                "text": text if isinstance(text, str) else None,
                "image": encoded,
                "truth": row.get("label"),
            }
        )
    return events


def replay(
    events: Sequence[Mapping[str, Any]],
    cfg: StreamConfig,
    kafka: dict[str, Any],
    timeout_s: float = 120.0,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    rate: float | None = None,
) -> dict[str, Any]:
    """Send `events` (at `rate` per second, else at once) and collect their answers.

    Reads the output and dead-letter topics from their current end, so a running consumer's
    answers to these events are what it sees; returns counts, accuracy against `truth` when the
    events carry it, and end-to-end latency (send to prediction produced).
    """
    from kafka import KafkaConsumer, KafkaProducer

    reader = KafkaConsumer(**kafka, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=20)
    producer = KafkaProducer(**kafka, linger_ms=5)
    try:
        partitions = _topic_partitions(reader, (cfg.output_topic, cfg.dead_letter_topic))
        reader.assign(partitions)
        reader.seek_to_end(*partitions)
        for partition in partitions:  # fix the end before sending
            reader.position(partition)
        wanted = {str(e["id"]) for e in events}
        start = time.monotonic()
        for i, event in enumerate(events):
            if rate:
                time.sleep(max(0.0, start + i / rate - time.monotonic()))
            value = {**event, "ts": int(time.time() * 1000)}
            producer.send(
                cfg.input_topic, key=str(event["id"]).encode(), value=json.dumps(value).encode()
            )
        producer.flush()
        results: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while wanted - results.keys() and time.monotonic() < deadline:
            for messages in reader.poll(timeout_ms=200).values():
                for message in messages:
                    result = _replay_result(message, cfg)
                    if result is None or result["id"] not in wanted or result["id"] in results:
                        continue
                    results[result["id"]] = result
                    if on_result is not None:
                        on_result(result)
    finally:
        producer.close(timeout=10)
        reader.close()
    return _replay_summary(events, results)


def _topic_partitions(consumer: Any, topics: Sequence[str], timeout_s: float = 30) -> list[Any]:
    from kafka.structs import TopicPartition

    deadline = time.monotonic() + timeout_s
    found: list[Any] = []
    for topic in topics:
        while not (partitions := consumer.partitions_for_topic(topic)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {topic!r} does not exist (`mmops up` creates it)")
            time.sleep(0.2)
        found += [TopicPartition(topic, p) for p in sorted(partitions)]
    return found


def _replay_result(message: Any, cfg: StreamConfig) -> dict[str, Any] | None:
    try:
        value = json.loads(message.value)
    except (TypeError, ValueError):
        return None
    if not isinstance(value, dict) or "id" not in value:
        return None
    if message.topic == cfg.dead_letter_topic:
        headers = {k: v.decode(errors="replace") for k, v in message.headers or []}
        return {
            "id": str(value["id"]),
            "error": headers.get(DEAD_LETTER_HEADER + "error.message", "?"),
            "reason": headers.get(DEAD_LETTER_HEADER + "error.reason", "?"),
            "sent_ts": value.get("ts"),
        }
    value["arrived_ms"] = message.timestamp
    return value


def _replay_summary(
    events: Sequence[Mapping[str, Any]], results: Mapping[str, dict[str, Any]]
) -> dict[str, Any]:
    predicted = [r for r in results.values() if "label" in r]
    latencies = [r["arrived_ms"] - r["event_ts"] for r in predicted if "event_ts" in r]
    judged = [r for r in predicted if r.get("truth") is not None]
    versions: dict[str, int] = {}
    for r in predicted:
        key = f"{r['model']['name']} v{r['model']['version']}"
        versions[key] = versions.get(key, 0) + 1
    summary: dict[str, Any] = {
        "sent": len(events),
        "predicted": len(predicted),
        "dead_letters": len(results) - len(predicted),
        "missing": len(events) - len(results),
        "versions": versions,
    }
    if judged:
        correct = sum(r["label"] == r["truth"] for r in judged)
        summary["accuracy"] = round(correct / len(judged), 4)
    if latencies:
        summary["latency_ms_p50"] = float(np.percentile(latencies, 50))
        summary["latency_ms_p99"] = float(np.percentile(latencies, 99))
    return summary
