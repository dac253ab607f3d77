"""Live predictions from Kafka: micro-batches through the one prediction path, at least once.

A `StreamServer` consumes JSON events in a consumer group, runs each micro-batch through
`Predictor.predict_batch`, produces one prediction per good event and sends every bad one, with
its original bytes, to the dead-letter topic. Offsets are committed only after the broker has
acknowledged everything the batch produced, so a crash loses nothing and repeats at most the
uncommitted batch of each partition. The bookkeeping is in `batching`, the batch's output in
`outputs`; this module is the loop and the clients.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mmops.config import Params, StreamConfig
from mmops.monitoring.monitor import DriftEvent
from mmops.serving.champion import ModelSource
from mmops.serving.logs import log_data
from mmops.serving.predictor import Predictor
from mmops.stream.batching import Batches, commit_offsets, rewind_offsets
from mmops.stream.clients import StreamClients, broker_connected, client_factories
from mmops.stream.drift import DriftWatch
from mmops.stream.health import Liveness
from mmops.stream.metrics import StreamMetrics
from mmops.stream.outputs import (
    DeliveryError,
    Served,
    model_failed,
    predict_messages,
    send_outputs,
    served_any,
)
from mmops.stream.settings import ServeStats, kafka_settings, serving_threads

__all__ = ["DeliveryError", "ServeStats", "StreamServer", "serving_threads"]

log = logging.getLogger(__name__)


class StreamServer:
    """A consumer-group member serving predictions; `run` until `stop` (or `max_events`).

    A micro-batch closes at `max_batch` messages, `max_batch_bytes` of them, or `max_wait_ms`
    after its first. Up to
    `workers` batches are predicted at once, on worker threads; their predictions and dead
    letters are then sent in order, one batch at a time, and a batch's offsets are committed
    once the broker has acknowledged all it sent, before the next batch is sent. So at most one
    batch is sent and not committed: a crash repeats at most that batch.

    `models`, `consumer_factory` and `producer_factory` replace the champion follower and
    kafka-python's KafkaConsumer and KafkaProducer (called with their keyword settings).
    """

    def __init__(
        self,
        params: Params,
        model_ref: str | None = None,
        kafka: dict[str, Any] | None = None,
        metrics: StreamMetrics | None = None,
        *,
        models: ModelSource | None = None,
        consumer_factory: Callable[..., Any] | None = None,
        producer_factory: Callable[..., Any] | None = None,
        on_alarm: Callable[[DriftEvent], None] | None = None,
    ) -> None:
        self.cfg: StreamConfig = params.stream
        if models is None:
            ref = model_ref or f"models:/{params.tracking.registered_model}@champion"
            predict = serving_threads(params.predict, self.cfg.workers)
            models = ModelSource(ref, predict, self.cfg.model_poll_s)
        self.models = models
        self.kafka = kafka if kafka is not None else kafka_settings()
        self.metrics = metrics or StreamMetrics()
        self.models.on_failure = self._model_failed
        self.stats = ServeStats()
        self.liveness = Liveness(self.cfg.liveness_timeout_s)
        self._stop = threading.Event()
        self._revoked = threading.Event()  # set by the group's listener, on the client's thread
        factories = client_factories(consumer_factory, producer_factory)
        self.clients = StreamClients(
            self.kafka, self.cfg, factories, self._stop, self._revoked, self.liveness.beat
        )
        self.metrics.watch(self.liveness, self._connected)
        self.drift: DriftWatch | None = None
        if params.drift.enabled:
            timeout = self.cfg.client_timeout_s
            self.drift = DriftWatch(
                params.drift, self.metrics, lambda: self.clients.producer, on_alarm, timeout
            )
        self._label_field = params.feedback.label_field
        self._workers: ThreadPoolExecutor | None = None
        # Owned by the thread in `run`.
        self._lag: dict[tuple[str, int], int] = {}
        self._batches = Batches(
            self.cfg.max_batch,
            self.cfg.max_wait_ms,
            self.cfg.workers,
            max_bytes=self.cfg.max_batch_bytes,
        )

    def stop(self) -> None:
        """Finish the batches in hand, commit them and leave; safe from a signal handler."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def consumer(self) -> Any:
        return self.clients.consumer

    @property
    def producer(self) -> Any:
        return self.clients.producer

    def run(self, max_events: int | None = None) -> ServeStats:
        """Serve until stopped, or until `max_events` events have been handled."""
        # A damaged champion is waited out (beating, so the probe knows it waits) until the
        # alias moves to a version that loads; None: stopped while waiting.
        self.liveness.not_ready = "loading the model"
        predictor = self.models.load(self._stop, self.liveness.beat)
        if predictor is None:
            self.models.close()
            return self.stats
        self.metrics.set_model(predictor)
        self.stats.versions.append(predictor.identity.version)
        if self.drift is not None:
            self.drift.start()
            self.drift.follow(predictor)
        log.info(
            "serving",
            extra=log_data(
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
        self.liveness.start()
        self._workers = ThreadPoolExecutor(self.cfg.workers, thread_name_prefix="mmops-predict")
        try:
            self._connect()
            self._serve(max_events)
            self._finish()
        finally:
            self._workers.shutdown(cancel_futures=True)
            self._close()
        return self.stats

    def _serve(self, max_events: int | None) -> None:
        from kafka.errors import KafkaError

        backoff = 0.5
        while not self.stopping:
            self.liveness.beat()
            if max_events is not None and self.stats.events >= max_events:
                break
            try:
                self._step(max_events)
                backoff = 0.5
            except (KafkaError, DeliveryError) as error:
                # The broker is away or refused a batch: nothing unacknowledged was
                # committed, so it is all read again once the broker is back.
                self.metrics.errors.labels(type(error).__name__).inc()
                self.stats.retries += 1
                log.warning(
                    "broker error; retrying the batch",
                    extra=log_data(error=f"{type(error).__name__}: {error}", retry_in_s=backoff),
                )
                client = "producer" if isinstance(error, DeliveryError) else "consumer"
                if self._client_failed(client, error):
                    backoff = 0.5  # a new client: no reason to wait longer
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            self.liveness.waiting(self._batches.in_hand + self._lag_total())

    def _connect(self) -> None:
        self.clients.connect()

    def _connected(self) -> bool | None:
        consumer = self.clients.consumer
        return consumer is not None and broker_connected(consumer) is not False

    def _client_failed(self, client: str, error: BaseException) -> bool:
        """Count a client's failure; True when it was stuck and has been replaced."""
        if self.stopping or not self.clients.failed(client, error):
            return False
        self.metrics.client_rebuilds.labels(client).inc()
        return True

    def _step(self, max_events: int | None = None) -> None:
        if not self._batches.flights:
            self._swap()  # between batches: each event is served by exactly one version
        try:
            # A closed batch goes to a free worker before anything is sent: the workers stay busy
            # while the main thread sends, waits for acks and commits.
            self._dispatch()
            self._deliver()
            if max_events is not None and self.stats.events >= max_events:
                return
            self._dispatch()
            if self._batches.full:
                # The next batch is ready and every worker busy (or a new champion waits).
                running = self._batches.running()
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
        if self.drift is not None:
            self.drift.follow(swapped)
        self.stats.versions.append(swapped.identity.version)
        log.info(
            "swapped to the new champion",
            extra=log_data(version=swapped.identity.version, backend=swapped.backend),
        )

    def _collect(self) -> None:
        """Poll into the open batch: up to max_batch messages, max_wait_ms after its first."""
        batches = self._batches
        polled = self.consumer.poll(timeout_ms=batches.poll_timeout_ms(), max_records=batches.room)
        self.clients.succeeded("consumer")
        messages = [m for ms in polled.values() for m in ms]
        if self._revoked.is_set():
            # A rebalance inside the poll: partitions that moved are read by their new owner from
            # the committed offset. The client keeps its position in those it still has, so
            # what was polled and not sent is read again from where it starts, in order.
            self._revoked.clear()
            self._rewind([*batches.forget(), *messages])
            return
        batches.add(messages)
        if not polled and batches.idle:
            self._record_lag()

    def _dispatch(self) -> None:
        """Hand the open batch to a worker once it has closed and a worker is free."""
        if not self._batches.open or self.stopping or self.models.ready:
            return  # a new champion waits for the batches in flight, then serves this one
        if not self._batches.can_dispatch():
            return
        predictor, workers = self.models.current, self._workers
        assert predictor is not None and workers is not None
        self.stats.first_event_at = self.stats.first_event_at or time.time()
        self._batches.dispatch(lambda batch: workers.submit(self._predict, predictor, batch))

    def _predict(self, predictor: Predictor, batch: list[Any]) -> Served:
        """On a worker: the batch's outputs, by the last good version if `predictor` is broken."""
        cfg, observe = self.cfg, self.metrics.model_latency.observe

        def predict(model: Predictor) -> Served:
            limits = (cfg.max_event_bytes, observe, cfg.max_id_chars)
            # Embeddings only for a version the monitor watches (one exported with references).
            watched = self.drift is not None and model.references is not None
            return predict_messages(model, batch, *limits, embeddings=watched)

        job = id(batch)
        self.liveness.predicting(job)
        try:
            return self.models.serve_batch(predictor, predict, served_any, model_failed)
        finally:
            self.liveness.predicted(job)

    def _deliver(self) -> None:
        """Send the predicted batches, oldest first, each acknowledged and committed in turn."""
        while (flight := self._batches.next_predicted()) is not None:
            self._send(flight.batch, flight.job.result())
            self._batches.sent()

    def _send(self, batch: Sequence[Any], served: Served) -> None:
        """Send a batch's predictions and dead letters; once all are acknowledged, commit it."""
        served = send_outputs(lambda: self.clients.producer, self.cfg, served, self._keep_sending)
        self.clients.succeeded("producer")
        self.liveness.acked()
        acked = time.time()
        for message, _, _ in served.predictions:
            self.metrics.end_to_end.observe(max(0.0, acked - message.timestamp / 1000))
        for _, reason, _ in served.dead:
            self.metrics.dead_letters.labels(reason).inc()
        self.metrics.events.labels("predicted").inc(len(served.predictions))
        self.metrics.events.labels("dead_letter").inc(len(served.dead))
        self.metrics.batch_size.observe(len(batch))
        self._monitor(served)
        self.stats.events += len(batch)
        self.stats.predicted += len(served.predictions)
        self.stats.dead_letters += len(served.dead)
        self.stats.batches += 1
        self._commit(batch)

    def _monitor(self, served: Served) -> None:
        """Hand an acknowledged batch to the drift monitor's thread (never waits for it)."""
        if self.drift is not None and served.predicted is not None:
            self.drift.submit(served.predicted, len(served.dead), self._label_field)

    def _keep_sending(self, error: BaseException, delay: float) -> bool:
        """After a send the broker may yet take failed: wait `delay` and try again (with a new
        producer if this one is stuck), unless stopping (then the batch stays uncommitted and
        is served again after a restart)."""
        self.metrics.errors.labels(type(error).__name__).inc()
        self.stats.retries += 1
        log.warning(
            "sends not acknowledged; sending them again",
            extra=log_data(error=f"{type(error).__name__}: {error}", retry_in_s=delay),
        )
        self.liveness.beat()  # waiting for the brokers, not stuck
        if self._client_failed("producer", error):
            delay = 0.0
        return not self._stop.wait(delay)

    def _model_failed(self, stage: str, version: str) -> None:
        self.metrics.model_failures.labels(stage, version).inc()

    def _commit(self, batch: Sequence[Any]) -> None:
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata, TopicPartition

        offsets = commit_offsets(batch, self.consumer.assignment())
        try:
            self.consumer.commit(
                {TopicPartition(*p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()}
            )
        except KafkaError as error:
            # Commits are cumulative: the next one covers this batch. Until then a restart or
            # the partition's next owner may serve it again (same ids), never skip it.
            self.metrics.errors.labels(type(error).__name__).inc()
            log.warning("commit failed", extra=log_data(error=str(error)))
            return
        self.stats.last_commit_at = time.time()
        self._record_lag()

    def _abandon(self) -> None:
        """After an error: rewind every partition to its first message not committed."""
        self._rewind(self._batches.forget())

    def _rewind(self, messages: Sequence[Any]) -> None:
        """Seek each assigned partition back to its first message in `messages` (in order)."""
        from kafka.structs import TopicPartition

        try:
            for partition, offset in rewind_offsets(messages, self.consumer.assignment()).items():
                self.consumer.seek(TopicPartition(*partition), offset)
        except Exception as error:  # the consumer itself failed: a new one starts from commits
            log.warning(
                "could not rewind", extra=log_data(error=f"{type(error).__name__}: {error}")
            )

    def _finish(self) -> None:
        """On the way out: send and commit the batches being predicted (not the open one)."""
        try:
            futures.wait([flight.job for flight in self._batches.flights])
            self._deliver()
        except Exception as error:  # not committed: served again after a restart
            log.warning(
                "batches in flight were not committed",
                extra=log_data(error=f"{type(error).__name__}: {error}"),
            )

    def _lag_total(self) -> int:
        """Events behind the assigned partitions' ends, as last measured."""
        return sum(self._lag.values())

    def _record_lag(self) -> None:
        self._lag = {}
        self.metrics.lag.clear()  # partitions a rebalance took away are not this consumer's
        for partition in self.consumer.assignment():
            end = self.consumer.highwater(partition)
            if end is None:
                continue
            position = self.consumer.position(partition, timeout_ms=100)
            if position is not None:
                lag = max(0, end - position)
                self._lag[(partition.topic, partition.partition)] = lag
                self.metrics.lag.labels(partition.topic, str(partition.partition)).set(lag)

    def _close(self) -> None:
        if self.drift is not None:
            self.drift.close()
        self.models.close()
        self.clients.close()
        log.info("stopped", extra=log_data(**self.stats.to_dict()))
