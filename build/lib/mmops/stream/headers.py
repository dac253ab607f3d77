"""Records whose header keys are not UTF-8: read with the keys escaped, then dead-lettered.

kafka-python decodes header keys strictly while it unpacks a fetch, inside `poll`, and has no hook
for it: one producer's bad key raised from every poll and stalled its partition, and seeking past
it skips the good records of its batch too. So the consumer reads such a record with each bad
key backslash-escaped and a marker header, and the serving loop dead-letters it like any bad
event. Hand-written because no client option or library covers it; checked against the pinned
kafka-python by tests/integration/test_stream.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mmops.stream.patches import marker, wrap_once

# Marks a record read with escaped header keys; its value: the indexes of the bad keys.
ESCAPED_HEADER = "mmops.escaped.header_keys"


def tolerate_header_keys() -> bool:
    """Let the Kafka consumer read records with non-UTF-8 header keys (once per process);
    False where the installed kafka-python has no such reader to wrap."""
    try:
        from kafka.record import default_records
    except ImportError:
        return False

    def wrap(strict: Callable[..., Any]) -> Callable[..., Any]:
        def read_msg(self: Any, *args: Any, **kwargs: Any) -> Any:
            start = self._pos
            try:
                return strict(self, *args, **kwargs)
            except UnicodeDecodeError:
                self._pos = start  # the strict reader moves it only once a record is complete
                return _read_escaped(self, default_records)

        return read_msg

    batch = getattr(default_records, "DefaultRecordBatch", None)
    return wrap_once(batch, "_read_msg", wrap, "header keys are read strictly")


def escaped_keys(headers: Any) -> str | None:
    """The marker a record read with escaped header keys carries: which keys, else None."""
    value = marker(headers, ESCAPED_HEADER)
    if value is None:
        return None
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def _read_escaped(batch: Any, records: Any) -> Any:
    """One v2 record (Kafka's record format) at `batch._pos`, header keys decoded with escapes."""
    decode_varint = records.decode_varint
    buffer, pos = batch._buffer, batch._pos
    length, pos = decode_varint(buffer, pos)
    start = pos
    _, pos = decode_varint(buffer, pos)  # attributes: unused in v2 records
    ts_delta, pos = decode_varint(buffer, pos)
    if batch.timestamp_type == batch.LOG_APPEND_TIME:
        timestamp = batch.max_timestamp
    else:
        timestamp = batch.first_timestamp + ts_delta
    offset_delta, pos = decode_varint(buffer, pos)
    key, pos = _nullable_bytes(buffer, pos, decode_varint)
    value, pos = _nullable_bytes(buffer, pos, decode_varint)
    count, pos = decode_varint(buffer, pos)
    headers: list[tuple[str, bytes | None]] = []
    bad = []
    for index in range(max(0, count)):
        raw, pos = _nullable_bytes(buffer, pos, decode_varint)
        h_value, pos = _nullable_bytes(buffer, pos, decode_varint)
        h_key = (raw or b"").decode("utf-8", "backslashreplace")
        if raw is not None and h_key.encode("utf-8") != raw:
            bad.append(str(index))
        headers.append((h_key, h_value))
    if count < 0 or pos - start != length:
        raise records.CorruptRecordError(f"invalid record at batch offset {batch.base_offset}")
    batch._pos = pos
    headers.append((ESCAPED_HEADER, ",".join(bad).encode()))
    return records.DefaultRecord(
        length,
        batch.base_offset + offset_delta,
        timestamp,
        batch.timestamp_type,
        key,
        value,
        headers,
    )


def _nullable_bytes(buffer: Any, pos: int, decode_varint: Any) -> tuple[bytes | None, int]:
    size, pos = decode_varint(buffer, pos)
    if size < 0:
        return None, pos
    return bytes(buffer[pos : pos + size]), pos + size
