"""What a micro-batch produces: one prediction per good event, one dead letter per bad one.

`predict_messages` runs on a worker thread and never touches the clients; `send_outputs` runs on
the serving thread and returns only once the broker has acknowledged every record it sent. Each
record is isolated: whatever one event's bytes, size or headers, an error in decoding,
predicting, serialising or sending it dead-letters that event and the batch goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from mmops.config import StreamConfig
from mmops.serving.logs import log_data
from mmops.serving.predictor import EMBEDS_KEY, Predictor
from mmops.stream.events import (
    PREFIX_BYTES,
    DeadLetter,
    EventError,
    dead_letter,
    decode_event,
    prediction_value,
)
from mmops.stream.headers import escaped_keys
from mmops.stream.record_batches import undecodable_batch

log = logging.getLogger(__name__)


class DeliveryError(RuntimeError):
    """The broker did not acknowledge a batch's output; its offsets stay uncommitted."""


@dataclass
class Served:
    """A predicted batch's output: (message, key, value) predictions and (message, reason,
    error) dead letters."""

    predictions: list[tuple[Any, bytes, bytes]]
    dead: list[tuple[Any, str, str]]
    # (message, event, result) of each predicted event, results with their embeddings, when
    # the batch is monitored for drift
    predicted: list[tuple[Any, dict[str, Any], dict[str, Any]]] | None = None


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:1000]


def predict_messages(
    predictor: Predictor,
    batch: Sequence[Any],
    max_event_bytes: int,
    observe_model_s: Callable[[float], None] = lambda _: None,
    max_id_chars: int = 1024,
    embeddings: bool = False,
) -> Served:
    """A batch's output messages, in input order; the predictor runs once, on the good events.
    With `embeddings`, `Served.predicted` also holds each predicted event with its embeddings."""
    received = time.time()
    events: list[tuple[Any, dict[str, Any]]] = []
    dead: list[tuple[Any, str, str]] = []
    for message in batch:
        try:
            if message.headers:  # most events have none: nothing to look for
                if (bad := escaped_keys(message.headers)) is not None:
                    raise EventError(f"headers: key {bad} is not UTF-8", "bad_header_key")
                if (lost := undecodable_batch(message.headers)) is not None:
                    raise EventError(batch_error(lost), "undecodable_batch")
            events.append((message, decode_event(message.value, max_event_bytes, max_id_chars)))
        except EventError as error:
            dead.append((message, error.reason, str(error)))
        except Exception as error:  # whatever the bytes, one event never fails its batch
            dead.append((message, "undecodable", describe(error)))
    start = time.perf_counter()
    results = predict_isolated(predictor, [event for _, event in events], embeddings)
    observe_model_s(time.perf_counter() - start)
    now = time.time()
    predictions = []
    predicted = [] if embeddings else None
    for (message, event), result in zip(events, results, strict=True):
        if "error" in result:
            dead.append(
                (message, str(result.get("reason", "invalid_record")), str(result["error"]))
            )
            continue
        try:
            value = prediction_value(event, result, received, now)
            predictions.append((message, value["id"].encode(), orjson.dumps(value, default=str)))
        except Exception as error:  # e.g. an extra field nested past orjson's depth limit
            dead.append((message, "unserialisable", describe(error)))
            continue
        if predicted is not None and EMBEDS_KEY in result:
            predicted.append((message, event, result))
    return Served(predictions, dead, predicted)


def batch_error(about: Mapping[str, Any]) -> str:
    """The dead letter's message for a record batch the client could not decode."""
    span = f"{about.get('first_offset')}..{about.get('last_offset')}"
    return f"record batch at offsets {span} ({about.get('codec')}) cannot be decoded: " + str(
        about.get("error")
    )


def predict_isolated(
    predictor: Predictor, records: list[dict[str, Any]], embeddings: bool = False
) -> list[dict[str, Any]]:
    """`predict_batch`'s results; a batch that fails as a whole is split in halves until each
    record that fails alone is found, which gets an error result (reason `predict_failed`)."""
    try:
        if embeddings:
            results = predictor.predict_batch(records, embeddings=True)
        else:
            results = predictor.predict_batch(records)
        if len(results) != len(records):
            raise RuntimeError(f"{len(results)} results for {len(records)} records")
        return results
    except Exception as error:
        if len(records) <= 1:
            return [
                {"id": _id(r), "error": describe(error), "reason": "predict_failed"}
                for r in records
            ]
        log.warning(
            "batch failed; splitting it",
            extra=log_data(records=len(records), error=describe(error)),
        )
        middle = len(records) // 2
        return predict_isolated(predictor, records[:middle], embeddings) + predict_isolated(
            predictor, records[middle:], embeddings
        )


def _id(record: Any) -> Any:
    return record.get("id") if isinstance(record, Mapping) else None


@dataclass(frozen=True)
class Outgoing:
    """One record to send: a prediction (`reason` None) or a dead letter of `message`."""

    topic: str
    message: Any
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None = None
    reason: str | None = None
    error: str = ""


def send_outputs(
    producer: Callable[[], Any],
    cfg: StreamConfig,
    served: Served,
    keep_trying: Callable[[BaseException, float], bool] = lambda error, delay: False,
) -> Served:
    """Send a batch's predictions and dead letters (with the event's own bytes and headers)
    with `producer()` (read on each try: `keep_trying` may replace a stuck producer); returns
    once the broker acknowledged them all, with what was sent.

    A record the broker can never take (too large, a bad topic, no rights, bad headers) is
    replaced by a small dead letter. Sends that failed for a reason that may pass (a broker away,
    a leader moving) are sent again, only those, for as long as `keep_trying(error, delay)` says
    (it waits `delay` seconds first); DeliveryError once it says no.
    """
    records = [Outgoing(cfg.output_topic, m, k, v) for m, k, v in served.predictions]
    for message, reason, error in served.dead:
        letter = dead_letter(message, reason, error, cfg.max_event_bytes)
        records.append(_dead(cfg, message, reason, error, letter))
    refused = _send_acked(producer, records, keep_trying)
    if not refused:
        return served
    fallbacks = []
    for record, problem in refused:
        reason = record.reason or "unsendable"
        error = f"{record.error} (refused: {describe(problem)})".strip()
        letter = dead_letter(record.message, reason, error, PREFIX_BYTES, original_headers=False)
        fallbacks.append(_dead(cfg, record.message, reason, error, letter))
    again = _send_acked(producer, fallbacks, keep_trying)
    if again:
        raise DeliveryError(f"dead letters refused: {describe(again[0][1])}")
    gone = {id(record.message) for record, _ in refused}
    return Served(
        [p for p in served.predictions if id(p[0]) not in gone],
        [d for d in served.dead if id(d[0]) not in gone]
        + [(f.message, f.reason or "", f.error) for f in fallbacks],
        None if served.predicted is None else [p for p in served.predicted if id(p[0]) not in gone],
    )


def _dead(cfg: StreamConfig, message: Any, reason: str, error: str, letter: DeadLetter) -> Outgoing:
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
    topic = cfg.dead_letter_topic
    return Outgoing(topic, message, letter.key, letter.value, letter.headers, reason, error)


def _send_acked(
    producer: Callable[[], Any],
    records: Sequence[Outgoing],
    keep_trying: Callable[[BaseException, float], bool],
) -> list[tuple[Outgoing, BaseException]]:
    """Send until each record is acknowledged or refused for good; returns the refused."""
    refused: list[tuple[Outgoing, BaseException]] = []
    pending, delay = list(records), 0.5
    while pending:
        failed = _send_once(producer(), pending, refused)
        if not failed:
            break
        error = failed[0][1]
        if not keep_trying(error, delay):
            raise DeliveryError(f"{len(failed)} of {len(pending)} sends failed: {describe(error)}")
        pending, delay = [record for record, _ in failed], min(delay * 2, 10.0)
    return refused


def _send_once(
    producer: Any, records: Sequence[Outgoing], refused: list[tuple[Outgoing, BaseException]]
) -> list[tuple[Outgoing, BaseException]]:
    """Send and flush; adds the records refused for good to `refused`, returns those that
    failed for a reason that may pass."""
    sends, failed = [], []
    for record in records:
        try:
            future = producer.send(
                record.topic, key=record.key, value=record.value, headers=record.headers
            )
        except Exception as error:
            # e.g. no metadata in time (may pass), or a record the client refuses (never will)
            (refused if _refused_for_good(error) else failed).append((record, error))
            continue
        sends.append((record, future))
    producer.flush()
    for record, future in sends:
        if future.is_done and future.failed() and _refused_for_good(future.exception):
            refused.append((record, future.exception))
        elif not future.is_done or future.failed():
            failed.append((record, future.exception or DeliveryError("not acknowledged")))
    return failed


def _refused_for_good(error: BaseException) -> bool:
    """An error that sending the same record again can never fix."""
    from kafka import errors

    if not isinstance(error, errors.KafkaError):
        return True  # the client refused the record itself (TypeError, ValueError)
    return isinstance(error, _per_record_errors())


def _per_record_errors() -> tuple[type[BaseException], ...]:
    from kafka import errors

    return (
        errors.MessageSizeTooLargeError,
        errors.RecordListTooLargeError,
        errors.InvalidTopicError,
        errors.TopicAuthorizationFailedError,
        errors.InvalidRecordError,
        errors.CorruptRecordError,
    )


def served_any(served: Served) -> bool:
    """Some event of the batch was predicted."""
    return bool(served.predictions)


def model_failed(served: Served) -> bool:
    """Some event failed in the model itself (not in its own bytes)."""
    return any(reason == "predict_failed" for _, reason, _ in served.dead)
