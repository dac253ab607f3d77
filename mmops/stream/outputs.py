"""What a micro-batch produces: one prediction per good event, one dead letter per bad one.

`predict_messages` runs on a worker thread and never touches the clients; `send_outputs` runs on
the serving thread and returns only once the broker has acknowledged every record it sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from mmops.config import StreamConfig
from mmops.serving.predictor import Predictor
from mmops.stream.events import EventError, dead_letter_headers, decode_event, prediction_value
from mmops.stream.logs import log_data

log = logging.getLogger(__name__)


class DeliveryError(RuntimeError):
    """The broker did not acknowledge a batch's output; its offsets stay uncommitted."""


@dataclass
class Served:
    """A predicted batch's output: (message, key, value) predictions and (message, reason,
    error) dead letters."""

    predictions: list[tuple[Any, bytes, bytes]]
    dead: list[tuple[Any, str, str]]


def predict_messages(
    predictor: Predictor,
    batch: Sequence[Any],
    max_event_bytes: int,
    observe_model_s: Callable[[float], None] = lambda _: None,
) -> Served:
    """A batch's output messages, in input order; the predictor runs once, on the good events."""
    received = time.time()
    events: list[tuple[Any, dict[str, Any]]] = []
    dead: list[tuple[Any, str, str]] = []
    for message in batch:
        try:
            events.append((message, decode_event(message.value, max_event_bytes)))
        except EventError as error:
            dead.append((message, error.reason, str(error)))
    start = time.perf_counter()
    results = predictor.predict_batch([event for _, event in events])
    observe_model_s(time.perf_counter() - start)
    now = time.time()
    predictions = []
    for (message, event), result in zip(events, results, strict=True):
        if "error" in result:
            dead.append((message, result.get("reason", "invalid_record"), result["error"]))
            continue
        value = prediction_value(event, result, received, now)
        predictions.append((message, value["id"].encode(), orjson.dumps(value, default=str)))
    return Served(predictions, dead)


def send_outputs(producer: Any, cfg: StreamConfig, served: Served) -> None:
    """Send a batch's predictions and dead letters (with the event's own bytes and headers);
    DeliveryError unless the broker acknowledged them all."""
    sends = [producer.send(cfg.output_topic, key=k, value=v) for _, k, v in served.predictions]
    for message, reason, error in served.dead:
        sends.append(
            producer.send(
                cfg.dead_letter_topic,
                key=message.key if message.key is not None or message.value else b"",
                value=message.value,
                headers=dead_letter_headers(message, reason, error),
            )
        )
        log.warning(
            "dead letter",
            extra=log_data(
                reason=reason,
                error=error,
                topic=message.topic,
                partition=message.partition,
                offset=message.offset,
            ),
        )
    producer.flush()
    failed = [f.exception for f in sends if not f.is_done or f.failed()]
    if failed:
        raise DeliveryError(f"{len(failed)} of {len(sends)} sends failed: {failed[0]}")
