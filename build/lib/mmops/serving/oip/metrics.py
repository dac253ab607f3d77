"""Prometheus metrics of the v2 server: requests by protocol and code, latency, batches, model."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    """The server's series, in a registry of its own (exposed at /metrics)."""

    def __init__(self, max_batch: int) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "mmops_http_requests",
            "Inference requests answered, by protocol (rest, grpc) and status code",
            ["protocol", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "mmops_http_request_seconds",
            "Time from a request's arrival to its answer, by protocol",
            ["protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch})
        self.batch_size = Histogram(
            "mmops_http_batch_size",
            "Records per batch run by the model",
            buckets=[s for s in sizes if s <= max_batch],
            registry=r,
        )
        self.batch_wait = Histogram(
            "mmops_http_batch_wait_seconds",
            "Time a batch's first request waited before the batch ran",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_service = Histogram(
            "mmops_http_batch_service_seconds",
            "Time the model took per batch (preprocessing included)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_cap = Gauge(
            "mmops_http_batch_cap", "The adaptive batch size cap (AIMD)", registry=r
        )
        self.queued = Gauge("mmops_http_queued_records", "Records waiting for a batch", registry=r)
        self.model = Gauge(
            "mmops_http_model_info",
            "The model version served (1)",
            ["model", "version", "backend"],
            registry=r,
        )
        self.swaps = Counter("mmops_http_model_swaps", "Champion swaps", registry=r)

    def on_batch(self, size: int, wait_s: float, service_s: float) -> None:
        self.batch_size.observe(size)
        self.batch_wait.observe(wait_s)
        self.batch_service.observe(service_s)

    def serving(self, model: str, version: str, backend: str) -> None:
        self.model.clear()
        self.model.labels(model, version, backend).set(1)
