"""The event contract: what a prediction request is, what a prediction and a dead letter carry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

# Event fields the prediction itself writes; an event field of the same name passes through as
# `event_<name>`, so the input's own `ts` survives next to the prediction's.
PREDICTION_FIELDS = ("id", "label", "scores", "model", "latency_ms", "ts")


CONSUMED_FIELDS = ("id", "text", "image")


DEAD_LETTER_HEADER = "mmops."


class EventError(ValueError):
    """An event that is not a prediction request; `reason` is a short code for metrics."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


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
