"""Stream settings: Kafka clients from the environment, record sizes, threads and a run's stats."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mmops.config import PredictConfig, StreamConfig
from mmops.local.stack import DEFAULT_BOOTSTRAP

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


# Key, headers and record framing on top of an event's value.
EVENT_OVERHEAD_BYTES = 64 * 1024


def message_bytes(cfg: StreamConfig) -> int:
    """The largest record the stream handles: an event of max_event_bytes with its framing."""
    return max(1 << 20, cfg.max_event_bytes + EVENT_OVERHEAD_BYTES)


def topic_configs(cfg: StreamConfig) -> dict[str, str]:
    """Settings for the stream's topics: brokers default to 1 MiB records, events go larger."""
    return {"max.message.bytes": str(message_bytes(cfg))}


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
