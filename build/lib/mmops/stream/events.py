"""The event contract: what a prediction request is, what a prediction and a dead letter carry."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from mmops.stream.record_batches import undecodable_batch

# Event fields the prediction itself writes; an event field of the same name passes through as
# `event_<name>`, so the input's own `ts` survives next to the prediction's.
PREDICTION_FIELDS = ("id", "label", "scores", "model", "latency_ms", "ts")


CONSUMED_FIELDS = ("id", "text", "image")


DEAD_LETTER_HEADER = "mmops."

# A dead letter must always be sendable: a value over the event limit, a key or an error message
# past these, or original headers past HEADER_BYTES travel as a prefix (or not at all), so the
# record stays under the producer's max_request_size whatever the event was.
PREFIX_BYTES = 1024
MESSAGE_CHARS = 1000
HEADER_BYTES = 16 * 1024


class EventError(ValueError):
    """An event that is not a prediction request; `reason` is a short code for metrics."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode_event(value: bytes | None, max_bytes: int, max_id_chars: int = 1024) -> dict[str, Any]:
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
    if len(record_id) > max_id_chars:
        # The id is the prediction's key: one of megabytes would make the record unsendable.
        raise EventError(
            f"id: {len(record_id)} characters exceeds stream.max_id_chars ({max_id_chars})",
            "id_too_long",
        )
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


@dataclass(frozen=True)
class DeadLetter:
    """The record a bad event becomes on the dead-letter topic."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


def dead_letter(
    message: Any, reason: str, error: str, max_bytes: int, original_headers: bool = True
) -> DeadLetter:
    """A sendable dead letter: the event's bytes, or a prefix of them past `max_bytes`, with
    the event's headers (unless `original_headers` is false) and ours."""
    value, key = message.value, message.key
    extra: dict[str, str] = {}
    if value is not None and (len(value) > max_bytes or reason == "event_too_large"):
        value = bytes(value[:PREFIX_BYTES])
        extra["value.truncated"] = str(len(message.value))
    if key is not None and len(key) > PREFIX_BYTES:
        key = bytes(key[:PREFIX_BYTES])
        extra["key.truncated"] = str(len(message.key))
    if key is None:
        key = b"" if not value else None
    if (lost := undecodable_batch(message.headers)) is not None:
        # The dead letter stands for every offset of the batch, not only the one it sits at.
        extra["source.first_offset"] = str(lost.get("first_offset"))
    headers = dead_letter_headers(message, reason, error, extra)
    if not original_headers:
        headers = [(k, v) for k, v in headers if k.startswith(DEAD_LETTER_HEADER)]
    return DeadLetter(key, value, headers)


def dead_letter_headers(
    message: Any, reason: str, error: str, extra: Mapping[str, str] | None = None
) -> list[tuple[str, bytes]]:
    """The original headers (as valid header pairs) plus why the event failed and where from."""
    ours = {
        "error.reason": reason,
        "error.message": error[:MESSAGE_CHARS],
        "source.topic": message.topic,
        "source.partition": str(message.partition),
        "source.offset": str(message.offset),
        "source.timestamp": str(message.timestamp),
        **(extra or {}),
    }
    original = _header_pairs(message.headers)
    if sum(len(k) + len(v) for k, v in original) > HEADER_BYTES:
        ours["headers.dropped"] = str(len(original))
        original = []
    return original + [(DEAD_LETTER_HEADER + k, v.encode()) for k, v in ours.items()]


def _header_pairs(headers: Any) -> list[tuple[str, bytes]]:
    """Headers the producer accepts: str keys, bytes values (a null value becomes empty)."""
    pairs = []
    for item in headers or []:
        if not isinstance(item, tuple | list) or len(item) != 2:
            continue
        key, value = item
        if isinstance(key, bytes | bytearray):
            key = bytes(key).decode("utf-8", "replace")
        key = str(key).encode("utf-8", "replace").decode()
        if key.startswith(DEAD_LETTER_HEADER):
            continue
        if value is None:
            value = b""
        elif isinstance(value, str):
            value = value.encode("utf-8", "replace")
        elif isinstance(value, bytes | bytearray | memoryview):
            value = bytes(value)
        else:
            value = str(value).encode("utf-8", "replace")
        pairs.append((key, value))
    return pairs
