"""Record batches the client cannot decode: read as one marker record, then dead-lettered.

kafka-python decompresses and checks a fetched batch inside `poll`. A batch it cannot decode (a
codec it has no library for or does not know, a corrupt compressed payload, a failed CRC) raised
from every poll, so the consumer retried the same fetch forever and served nothing, on any
partition. Wrapped here, such a batch reads as one record at the batch's last offset carrying the
batch's raw bytes and a marker header (its offsets and the error); the serving loop dead-letters
it, its offsets are committed like any served event's, and the partition moves on. Hand-written
because the client has no option or hook for it; checked against the pinned kafka-python by
tests/faults/test_stream_faults.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

from mmops.serving.logs import log_data
from mmops.stream.patches import marker, wrap_once

log = logging.getLogger(__name__)

# Marks a record that stands for an undecodable batch; its value: JSON with first_offset,
# last_offset, codec and error.
UNDECODABLE_HEADER = "mmops.undecodable.batch"

# Kafka's compression attribute values (the record batch's low three bits).
CODECS = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}


def tolerate_undecodable_batches() -> bool:
    """Let the consumer read past record batches it cannot decode (once per process); False
    where the installed kafka-python has no such reader to wrap."""
    try:
        from kafka.consumer.fetcher import Fetcher
    except ImportError:
        return False

    def wrap(strict: Callable[..., Any]) -> Callable[..., Any]:
        def unpack(self: Any, tp: Any, records: Any, *args: Any, **kwargs: Any) -> Any:
            return strict(self, tp, _TolerantRecords(records, tp), *args, **kwargs)

        return unpack

    partition_records = getattr(Fetcher, "PartitionRecords", None)
    return wrap_once(partition_records, "_unpack_records", wrap, "undecodable batches stall")


def undecodable_batch(headers: Any) -> dict[str, Any] | None:
    """What the marker of an undecodable batch says (offsets, codec, error), else None."""
    value = marker(headers, UNDECODABLE_HEADER)
    if value is None:
        return None
    try:
        found = json.loads(value)
    except (TypeError, ValueError):
        return {"error": "unreadable marker"}
    return found if isinstance(found, dict) else {"error": "unreadable marker"}


class _TolerantRecords:
    """A fetch's record batches, each one guarded (see `_TolerantBatch`)."""

    def __init__(self, records: Any, tp: Any) -> None:
        self._records = records
        self._tp = tp

    def next_batch(self, *args: Any, **kwargs: Any) -> Any:
        batch = self._records.next_batch(*args, **kwargs)
        if batch is None or getattr(batch, "magic", 2) < 2:
            return batch  # message formats before Kafka 0.11 pass through as they were
        return _TolerantBatch(batch, self._tp)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._records, name)


class _TolerantBatch:
    """A v2 record batch whose records, or a marker record, always come out."""

    def __init__(self, batch: Any, tp: Any) -> None:
        self._batch = batch
        self._tp = tp
        self._crc_failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batch, name)

    def validate_crc(self) -> bool:
        # A failed check becomes the marker instead of an exception raised from every poll.
        self._crc_failed = not self._batch.validate_crc()
        return True

    def __iter__(self) -> Iterator[Any]:
        batch = self._batch
        if self._crc_failed:
            yield self._marker(batch.base_offset, "CorruptRecordError: the batch fails its CRC")
            return
        next_offset = batch.base_offset
        try:
            records = iter(batch)  # decompresses the batch
            for record in records:
                next_offset = record.offset + 1
                yield record
        except Exception as error:  # whatever the codec or bytes, the partition moves on
            first = next_offset
            yield self._marker(first, f"{type(error).__name__}: {error}"[:1000])

    def _marker(self, first_offset: int, error: str) -> Any:
        from kafka.record.default_records import DefaultRecord

        batch = self._batch
        codec = CODECS.get(batch.compression_type, f"unknown ({batch.compression_type})")
        about = {
            "first_offset": first_offset,
            "last_offset": batch.last_offset,
            "codec": codec,
            "error": error,
        }
        log.error(
            "record batch cannot be decoded; dead-lettering its offsets",
            extra=log_data(topic=self._tp.topic, partition=self._tp.partition, **about),
        )
        # The batch's bytes as fetched (still compressed where decompression failed), so
        # nothing is lost: the dead letter keeps them for a reader that can decode them.
        raw = bytes(batch._buffer)
        stamp = batch.max_timestamp if batch.max_timestamp >= 0 else batch.first_timestamp
        headers = [(UNDECODABLE_HEADER, json.dumps(about).encode())]
        return DefaultRecord(
            len(raw), batch.last_offset, stamp, batch.timestamp_type, None, raw, headers
        )
