"""The settings of the Open Inference Protocol v2 server (`serve` in params.yaml)."""

from __future__ import annotations

from dataclasses import dataclass

from mmops.config.errors import ConfigError


@dataclass(frozen=True)
class ServeConfig:
    """The Open Inference Protocol v2 server (`mmops serve-http`): batching and limits."""

    # Requests are batched up to max_batch_size records. The batch cap adapts (AIMD, as Clipper
    # does): it grows while a batch's service time stays under latency_target_ms and shrinks by
    # a tenth when one is over; a batch waits for more requests at most max_wait_ms, and only
    # while the wait fits in the latency target.
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    latency_target_ms: float = 100.0
    max_queue: int = 1024  # records waiting; beyond it a request gets 503 (retry later)
    max_body_bytes: int = 64_000_000  # a request body over it gets 413, before it is read
    request_timeout_s: float = 30.0  # a request waiting longer for its batch gets 503
    grpc_workers: int = 32  # threads answering gRPC calls (each waits for its batch)
    model_poll_s: float = 10.0  # how often to look for a new champion
    # /healthz fails once a batch is stuck this long, or requests wait and none is served.
    liveness_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if min(self.max_batch_size, self.max_queue, self.max_body_bytes, self.grpc_workers) < 1:
            raise ConfigError(
                "serve: max_batch_size, max_queue, max_body_bytes and grpc_workers must be >= 1"
            )
        if self.max_wait_ms < 0 or self.latency_target_ms <= 0:
            raise ConfigError("serve: max_wait_ms must be >= 0 and latency_target_ms > 0")
        times = (self.request_timeout_s, self.model_poll_s, self.liveness_timeout_s)
        if min(times) <= 0:
            raise ConfigError(
                "serve: request_timeout_s, model_poll_s and liveness_timeout_s must be > 0"
            )
