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
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
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

    @property
    def ready(self) -> bool:
        """A new version is loaded and waits for `swap`."""
        with self._lock:
            return self._pending is not None

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
class Served:
    """A predicted batch's output: (message, key, value) predictions and (message, reason,
    error) dead letters."""

    predictions: list[tuple[Any, bytes, bytes]]
    dead: list[tuple[Any, str, str]]


@dataclass
class Flight:
    """A micro-batch on its way: predicted on a worker thread, then sent and committed in turn."""

    batch: list[Any]
    job: Future[Served]


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


def serving_threads(predict: PredictConfig, workers: int) -> PredictConfig:
    """The predictor settings for `workers` batches predicted at once: the cores shared out.

    ONNX Runtime splits each operator evenly over its threads, so two batches on one session
    of all the cores stall each other; each on its share of the cores keeps every core busy,
    one batch's model run beside the next one's image decoding (bench/stream_throughput.py).
    """
    if predict.threads:
        return predict
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return dataclasses.replace(predict, threads=max(1, (cores or 1) // workers))


class StreamServer:
    """A consumer-group member serving predictions; `run` until `stop` (or `max_events`).

    A micro-batch closes at `max_batch` messages or `max_wait_ms` after its first. Up to
    `workers` batches are predicted at once, on worker threads; their predictions and dead
    letters are then sent in order, one batch at a time, and a batch's offsets are committed
    once the broker has acknowledged all it sent, before the next batch is sent. So at most one
    batch is sent and not committed: a crash repeats at most that batch.
    """

    def __init__(
        self,
        params: Params,
        model_ref: str | None = None,
        kafka: dict[str, Any] | None = None,
        metrics: StreamMetrics | None = None,
    ) -> None:
        self.cfg: StreamConfig = params.stream
        ref = model_ref or f"models:/{params.tracking.registered_model}@champion"
        predict = serving_threads(params.predict, self.cfg.workers)
        self.models = ModelSource(ref, predict, self.cfg.model_poll_s)
        self.kafka = kafka if kafka is not None else kafka_settings()
        self.metrics = metrics or StreamMetrics()
        self.stats = ServeStats()
        self._stop = threading.Event()
        self.consumer: Any = None
        self.producer: Any = None
        self._workers: ThreadPoolExecutor | None = None
        # Owned by the thread in `run`: the batch being collected (and when it closes,
        # max_wait_ms after its first message) and the batches being predicted, oldest first;
        # none of them sent yet.
        self._open: list[Any] = []
        self._closes_at = 0.0
        self._flights: deque[Flight] = deque()
        self._revoked = threading.Event()  # set by the group's listener, on the client's thread

    def stop(self) -> None:
        """Finish the batches in hand, commit them and leave; safe from a signal handler."""
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
                workers=self.cfg.workers,
                threads=self.models.config.threads,
            ),
        )
        self._workers = ThreadPoolExecutor(self.cfg.workers, thread_name_prefix="mmops-predict")
        try:
            self._connect()
            backoff = 0.5
            while not self.stopping:
                if max_events is not None and self.stats.events >= max_events:
                    break
                try:
                    self._step(max_events)
                    backoff = 0.5
                except Exception as error:
                    from kafka.errors import KafkaError

                    if not isinstance(error, KafkaError | DeliveryError):
                        raise
                    # The broker is away or refused a batch: nothing unacknowledged was
                    # committed, so it is all read again once the broker is back.
                    self.metrics.errors.labels(type(error).__name__).inc()
                    self.stats.retries += 1
                    log.warning(
                        "broker error; retrying the batch",
                        extra=_data(error=f"{type(error).__name__}: {error}", retry_in_s=backoff),
                    )
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
            self._finish()
        finally:
            self._workers.shutdown(cancel_futures=True)
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
                listener = _rebalance_log(self._revoked)
                self.consumer.subscribe([cfg.input_topic], listener=listener)
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

    def _step(self, max_events: int | None = None) -> None:
        if not self._flights:
            self._swap()  # between batches: each event is served by exactly one version
        try:
            # A closed batch goes to a free worker before anything is sent: the workers stay busy
            # while the main thread sends, waits for acks and commits.
            self._dispatch()
            self._deliver()
            if max_events is not None and self.stats.events >= max_events:
                return
            self._dispatch()
            if len(self._open) >= self.cfg.max_batch:
                # The next batch is ready and every worker busy (or a new champion waits).
                running = [flight.job for flight in self._flights if not flight.job.done()]
                futures.wait(running, timeout=0.2, return_when=futures.FIRST_COMPLETED)
                return
            self._collect()
            self._dispatch()
        except Exception:
            # Nothing unacknowledged is committed: read it all again (duplicates, never gaps).
            self._abandon()
            raise

    def _swap(self) -> None:
        swapped = self.models.swap()
        if swapped is None:
            return
        self.metrics.set_model(swapped)
        self.metrics.swaps.inc()
        self.stats.versions.append(swapped.identity.version)
        log.info(
            "swapped to the new champion",
            extra=_data(version=swapped.identity.version, backend=swapped.backend),
        )

    def _collect(self) -> None:
        """Poll into the open batch: up to max_batch messages, max_wait_ms after its first."""
        cfg, consumer = self.cfg, self.consumer
        timeout = 200
        if self._open:
            closes_in = self._closes_at - time.monotonic()
            timeout = max(1, int(closes_in * 1000)) if not self._flights else 5
        elif self._flights:
            timeout = 5  # come back soon: a batch in flight may be predicted
        polled = consumer.poll(timeout_ms=timeout, max_records=cfg.max_batch - len(self._open))
        if self._revoked.is_set():
            # A rebalance inside the poll: partitions that moved are read by their new owner from
            # the committed offset. The client keeps its position in those it still has, so
            # what was polled and not sent is read again from where it starts, in order.
            self._revoked.clear()
            self._rewind([*self._forget(), *(m for ms in polled.values() for m in ms)])
            return
        for messages in polled.values():
            if messages and not self._open:
                self._closes_at = time.monotonic() + cfg.max_wait_ms / 1000
            self._open.extend(messages)
        if not polled and not self._open and not self._flights:
            self._record_lag()

    def _dispatch(self) -> None:
        """Hand the open batch to a worker once it has closed and a worker is free."""
        cfg = self.cfg
        if not self._open or self.stopping or self.models.ready:
            return  # a new champion waits for the batches in flight, then serves this one
        if len(self._open) < cfg.max_batch and time.monotonic() < self._closes_at:
            return
        if sum(not flight.job.done() for flight in self._flights) >= cfg.workers:
            return
        batch, self._open = self._open, []
        predictor = self.models.current
        assert predictor is not None and self._workers is not None
        self.stats.first_event_at = self.stats.first_event_at or time.time()
        self._flights.append(Flight(batch, self._workers.submit(self._predict, predictor, batch)))

    def _predict(self, predictor: Predictor, batch: Sequence[Any]) -> Served:
        """A batch's output messages, on a worker thread (it never touches the clients)."""
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
        predictions = []
        for (message, event), result in zip(events, results, strict=True):
            if "error" in result:
                dead.append((message, result.get("reason", "invalid_record"), result["error"]))
                continue
            value = prediction_value(event, result, received, now)
            predictions.append((message, value["id"].encode(), orjson.dumps(value, default=str)))
        return Served(predictions, dead)

    def _deliver(self) -> None:
        """Send the predicted batches, oldest first, each acknowledged and committed in turn."""
        while self._flights and self._flights[0].job.done():
            self._send(self._flights[0].batch, self._flights[0].job.result())
            self._flights.popleft()

    def _send(self, batch: Sequence[Any], served: Served) -> None:
        """Send a batch's predictions and dead letters; once all are acknowledged, commit it."""
        sends = [
            self.producer.send(self.cfg.output_topic, key=key, value=value)
            for _, key, value in served.predictions
        ]
        for message, reason, error in served.dead:
            sends.append(
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
        self.producer.flush()
        failed = [f.exception for f in sends if not f.is_done or f.failed()]
        if failed:
            raise DeliveryError(f"{len(failed)} of {len(sends)} sends failed: {failed[0]}")
        acked = time.time()
        for message, _, _ in served.predictions:
            self.metrics.end_to_end.observe(max(0.0, acked - message.timestamp / 1000))
        for _, reason, _ in served.dead:
            self.metrics.dead_letters.labels(reason).inc()
        self.metrics.events.labels("predicted").inc(len(served.predictions))
        self.metrics.events.labels("dead_letter").inc(len(served.dead))
        self.metrics.batch_size.observe(len(batch))
        self.stats.events += len(batch)
        self.stats.predicted += len(served.predictions)
        self.stats.dead_letters += len(served.dead)
        self.stats.batches += 1
        self._commit(batch)

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

    def _forget(self) -> list[Any]:
        """Drop the batches not yet sent (their predictions are never produced); returns their
        messages, oldest first."""
        dropped = [m for flight in self._flights for m in flight.batch] + self._open
        for flight in self._flights:
            flight.job.cancel()  # one already running finishes; its result is ignored
        self._flights.clear()
        self._open = []
        return dropped

    def _abandon(self) -> None:
        """After an error: rewind every partition to its first message not committed."""
        self._rewind(self._forget())

    def _rewind(self, messages: Sequence[Any]) -> None:
        """Seek each assigned partition back to its first message in `messages` (in order)."""
        first: dict[Any, int] = {}
        for message in messages:
            first.setdefault(_partition(message), message.offset)
        try:
            assigned = self.consumer.assignment()
            for partition, offset in first.items():
                if partition in assigned:
                    self.consumer.seek(partition, offset)
        except Exception as error:  # the consumer itself failed: a new one starts from commits
            log.warning("could not rewind", extra=_data(error=f"{type(error).__name__}: {error}"))

    def _finish(self) -> None:
        """On the way out: send and commit the batches being predicted (not the open one)."""
        try:
            futures.wait([flight.job for flight in self._flights])
            self._deliver()
        except Exception as error:  # not committed: served again after a restart
            log.warning(
                "batches in flight were not committed",
                extra=_data(error=f"{type(error).__name__}: {error}"),
            )

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


def _rebalance_log(revoked_flag: threading.Event) -> Any:
    """Logs the group's moves (`partitions assigned` tells that this consumer now serves) and
    flags revocations to the serving loop, which then rewinds what it polled and did not send.
    Runs on the client's thread, so it only sets the flag."""
    from kafka import ConsumerRebalanceListener

    class Listener(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked: Any) -> None:
            if revoked:
                revoked_flag.set()
            log.info("partitions revoked", extra=_data(partitions=sorted(map(str, revoked))))

        def on_partitions_lost(self, lost: Any) -> None:
            if lost:
                revoked_flag.set()
            log.info("partitions lost", extra=_data(partitions=sorted(map(str, lost))))

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
