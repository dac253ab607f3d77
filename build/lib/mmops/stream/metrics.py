"""Prometheus metrics of one consumer."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mmops.stream.health import Liveness, health_app, serve_http

if TYPE_CHECKING:
    from mmops.serving.predictor import Predictor


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
        self.model_failures = Counter(
            "mmops_stream_model_failures",
            "Champion versions that failed to load or to predict; the last good one kept serving",
            ["stage", "version"],
            registry=r,
        )
        self._client_metrics()
        self._drift_metrics()
        self._server: Any = None

    def _client_metrics(self) -> None:
        from prometheus_client import Counter, Gauge

        self.broker_connected = Gauge(
            "mmops_stream_broker_connected",
            "1 while the consumer holds a connection to a broker",
            registry=self.registry,
        )
        self.since_ack = Gauge(
            "mmops_stream_seconds_since_last_ack",
            "Seconds since the broker last acknowledged a batch's output (or serving began)",
            registry=self.registry,
        )
        self.client_rebuilds = Counter(
            "mmops_stream_client_rebuilds",
            "Kafka clients replaced because they could not recover by themselves",
            ["client"],
            registry=self.registry,
        )

    def _drift_metrics(self) -> None:
        from prometheus_client import Counter, Gauge

        r = self.registry

        def gauge(name: str, about: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, about, list(labels), registry=r)

        signal = ("modality",)
        self.drift_statistic = gauge(
            "mmops_drift_statistic", "Online MMD^2 of the last window against the reference", signal
        )
        self.drift_threshold = gauge(
            "mmops_drift_threshold", "The MMD^2 an alarm needs (calibrated to drift.ert)", signal
        )
        self.drift_alarm = gauge("mmops_drift_alarm", "1 while a signal is in drift", signal)
        self.drift_novel = gauge(
            "mmops_drift_novel_events", "Events of the last window unlike the reference", signal
        )
        self.drift_novel_threshold = gauge(
            "mmops_drift_novel_threshold", "The novel events an alarm needs", signal
        )
        self.online_accuracy = gauge(
            "mmops_online_accuracy", "Rolling accuracy on events that came labelled", ("version",)
        )
        self.label_share = gauge(
            "mmops_prediction_label_share", "Rolling share of predictions per label", ("label",)
        )
        self.reference_label_share = gauge(
            "mmops_reference_label_share", "Share per label on the reference", ("label",)
        )
        self.confidence = gauge(
            "mmops_prediction_confidence_mean", "Rolling mean of the top class probability"
        )
        self.reference_confidence = gauge(
            "mmops_reference_confidence_mean", "Mean top class probability on the reference"
        )
        self.dead_letter_rate = gauge(
            "mmops_stream_dead_letter_rate", "Rolling share of events sent to the dead-letter topic"
        )
        self.drift_skipped = Counter(
            "mmops_drift_skipped_batches",
            "Batches the drift monitor could not keep up with (served, not monitored)",
            registry=r,
        )

    def set_references(self, monitor: Any) -> None:
        """A new version's thresholds and reference figures (a DriftMonitor)."""
        for gauge in (self.drift_statistic, self.drift_threshold, self.drift_alarm):
            gauge.clear()
        for gauge in (self.drift_novel, self.drift_novel_threshold, self.reference_label_share):
            gauge.clear()
        self.label_share.clear()
        self.online_accuracy.clear()  # only the served version's: another's would be stale
        for name, state in monitor.signals.items():
            self.drift_threshold.labels(name).set(state.detector.mmd.threshold)
            self.drift_novel_threshold.labels(name).set(state.detector.novelty.threshold)
            self.drift_alarm.labels(name).set(0)
        references = monitor.references
        for label, share in zip(references.labels, references.label_shares(), strict=True):
            self.reference_label_share.labels(label).set(float(share))
        self.reference_confidence.set(references.mean_confidence())

    def set_drift(self, monitor: Any) -> None:
        """The monitor's figures after a batch."""
        for name, state in monitor.signals.items():
            self.drift_statistic.labels(name).set(state.statistic)
            self.drift_novel.labels(name).set(state.novel)
            self.drift_alarm.labels(name).set(float(state.alarm))
        for label, share in monitor.label_shares().items():
            self.label_share.labels(label).set(share)
        self.confidence.set(monitor.mean_confidence())
        self.dead_letter_rate.set(monitor.dead_letter_rate())
        if (accuracy := monitor.accuracy()) is not None:
            self.online_accuracy.labels(monitor.version).set(accuracy)

    def serve(self, port: int, liveness: Liveness | None = None) -> None:
        """Expose /metrics, and /healthz from `liveness`, on `port` (all interfaces, for a
        scraper or a probe from another container)."""
        from prometheus_client import make_wsgi_app

        app = make_wsgi_app(self.registry)
        self._server = serve_http(app if liveness is None else health_app(liveness, app), port)

    def watch(self, liveness: Liveness, connected: Callable[[], bool | None]) -> None:
        """Read the time since the last acknowledgement and the broker connection at scrape."""
        self.since_ack.set_function(liveness.since_ack)
        self.broker_connected.set_function(lambda: float(bool(connected())))

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def set_model(self, predictor: Predictor) -> None:
        self.model.clear()
        identity = predictor.identity
        self.model.labels(identity.name, identity.version, predictor.backend).set(1)
