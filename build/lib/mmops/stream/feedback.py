"""Labelled feedback from the stream: new events, late labels and predictions read from their
topics, joined, written as a validated and versioned snapshot, merged into the current data.

The run reads every partition of the three topics from the offsets its consumer group
committed (assigned, not subscribed: no rebalance to wait for, and no pause/resume) until
nothing new arrives for `timeout_s`. It commits only once the snapshot and the merged data are
written and versioned: at least once. A run that fails, or finds fewer than feedback.min_rows
labelled events, commits nothing, so the next run reads the same records again; rows written
twice have the same ids, which the merge resolves.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from mmops.config import Params
from mmops.data import snapshot
from mmops.data.dataset import load_splits
from mmops.data.feedback import (
    Collected,
    FeedbackState,
    LabelledEvent,
    Location,
    Merge,
    Rejection,
    enough_rows,
    join_labels,
    online_accuracy,
    snapshot_record,
)
from mmops.stream.clients import consumer_settings
from mmops.stream.events import EventError, decode_event
from mmops.stream.headers import escaped_keys, tolerate_header_keys
from mmops.stream.record_batches import tolerate_undecodable_batches, undecodable_batch
from mmops.stream.settings import kafka_settings

GROUP_ID = "mmops-feedback"
TOPIC_WAIT_S = 30.0


@dataclass
class FeedbackResult:
    """What one feedback run did; `to_dict` is the summary JSON."""

    snapshot: str | None
    rows: int
    label_from: dict[str, int]
    read: dict[str, int]
    rejected: dict[str, int]
    rejections: list[dict[str, Any]]
    waiting: int  # late labels whose event no run has read yet
    unlabelled: int  # events read now and not written: a later label can still find them
    accuracy: dict[str, dict[str, Any]]
    unpredicted: int
    committed: bool
    message: str
    merged: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)  # path -> DVC md5
    dvc_files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect_feedback(
    params: Params,
    kafka: Mapping[str, Any] | None = None,
    *,
    timeout_s: float | None = None,
    max_records: int | None = None,
    group_id: str = GROUP_ID,
    dvc: bool = True,
    now: datetime | None = None,
) -> FeedbackResult:
    """Read what is new, write it as a snapshot, merge, version, then commit (see the module).

    `kafka` defaults to `kafka_settings()` (KAFKA_BOOTSTRAP_SERVERS, ...); `timeout_s` to
    feedback.timeout_s. With `dvc` false nothing is versioned; otherwise a path outside a DVC
    repository fails before anything is read."""
    cfg = params.feedback
    kafka = kafka_settings() if kafka is None else kafka
    out_dir, merged_dir = Path(cfg.out_dir), Path(cfg.merged_dir)
    root = snapshot.require_dvc(out_dir, merged_dir) if dvc else None
    base_dir = Path(params.data.dir)
    base = load_splits(base_dir, params)  # every row's split made explicit: test stays fixed
    classes = params.validate.labels or sorted({x for x in base["label"] if isinstance(x, str)})
    state = snapshot.load_state(out_dir)
    consumer = group_reader(kafka, params, group_id)
    try:
        topics = (params.stream.input_topic, cfg.topic, params.stream.output_topic)
        partitions = topic_partitions(consumer, topics)
        consumer.assign(partitions)
        idle_s = cfg.timeout_s if timeout_s is None else timeout_s
        collected, positions = read_new(consumer, params, idle_s, max_records)
        joined = join_labels(collected, state, classes)
        records, unwritten = labelled_records(joined.rows, params, kafka)
        written = {record["id"] for record, _ in records}
        rows = [row for row in joined.rows if row.id in written]
        rejections = [*collected.rejections, *joined.rejections, *unwritten]
        result = summary(collected, rows, rejections, len(joined.waiting), state)
        if not enough_rows(len(records), cfg.min_rows):
            result.message = _too_few(len(records), cfg.min_rows, bool(positions))
            return result
        first = consumer.beginning_offsets(partitions)
        starts = {(tp.topic, tp.partition): offset for tp, offset in first.items()}
        stamp = now or datetime.now(UTC)
        name = snapshot.snapshot_name(stamp, out_dir)
        provenance = provenance_of(result, rows, positions, group_id, stamp)
        after = state.advance(collected, joined.waiting, starts)
        folder, merge = snapshot.publish(params, name, records, provenance, after, base_dir, base)
        published(result, folder, merge, base_dir, merged_dir)
        if root is not None:
            versions = snapshot.dvc_add(root, [folder, merged_dir])
            result.versions = {path: version.md5 for path, version in versions.items()}
            result.dvc_files = snapshot.dvc_files([folder, merged_dir])
        commit(consumer, positions)
        result.committed = True
        return result
    finally:
        consumer.close()


def group_reader(kafka: Mapping[str, Any], params: Params, group_id: str) -> Any:
    """A consumer in `group_id` for offsets only: it is assigned partitions, never subscribed."""
    from kafka import KafkaConsumer

    tolerate_header_keys()
    tolerate_undecodable_batches()
    return KafkaConsumer(**kafka, **{**consumer_settings(params.stream), "group_id": group_id})


def provenance_of(
    result: FeedbackResult,
    rows: Sequence[LabelledEvent],
    positions: Mapping[tuple[str, int], int],
    group_id: str,
    stamp: datetime,
) -> dict[str, Any]:
    """feedback.json of a snapshot: where each row and its label came from, what was left out."""
    return {
        "created": stamp.isoformat(),
        "group_id": group_id,
        "offsets": {f"{t}:{p}": o for (t, p), o in sorted(positions.items())},
        "rows": [_provenance(row) for row in rows],
        "accuracy": result.accuracy,
        "rejections": result.rejections,
    }


def _too_few(rows: int, min_rows: int, read: bool) -> str:
    if not read:
        return "nothing new on the topics: no snapshot"
    return (
        f"{rows} labelled events, fewer than feedback.min_rows ({min_rows}): no snapshot; "
        "nothing committed, so the next run reads them again"
    )


def summary(
    collected: Collected,
    rows: Sequence[LabelledEvent],
    rejections: Sequence[Rejection],
    waiting: int,
    state: FeedbackState,
) -> FeedbackResult:
    """The run's figures before anything is written."""
    accuracy, unpredicted = online_accuracy(rows, state.predictions, collected.predictions)
    return FeedbackResult(
        snapshot=None,
        rows=len(rows),
        label_from=dict(Counter(row.label_from for row in rows)),
        read=dict(collected.read),
        rejected=dict(Counter(r.reason for r in rejections)),
        rejections=[r.to_dict() for r in rejections],
        waiting=waiting,
        unlabelled=len(set(collected.events) - {row.id for row in rows}),
        accuracy=accuracy,
        unpredicted=unpredicted,
        committed=False,
        message="",
    )


def published(
    result: FeedbackResult, folder: Path, merge: Merge, base_dir: Path, merged_dir: Path
) -> None:
    result.snapshot = str(folder)
    latest = merge.snapshots[-1]
    result.merged = {
        "path": str(merged_dir),
        "base": str(base_dir),
        "rows": len(merge.rows),
        "sources": dict(merge.sources()),
        "replaced": latest.replaced,
        "kept_split": latest.kept_split,
    }
    result.message = f"snapshot {folder}: {result.rows} rows, merged into {merged_dir}"


def _provenance(row: LabelledEvent) -> dict[str, Any]:
    where = row.location
    return {
        "id": row.id,
        "label": row.label,
        "label_from": row.label_from,
        "event": f"{where.topic}:{where.partition}@{where.offset}",
    }


def commit(consumer: Any, positions: Mapping[tuple[str, int], int]) -> None:
    """Commit the offsets past every record the run read."""
    from kafka.errors import KafkaError
    from kafka.structs import OffsetAndMetadata, TopicPartition

    offsets = {
        TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in positions.items()
    }
    try:
        consumer.commit(offsets)
    except KafkaError as error:
        raise snapshot.FeedbackError(
            f"the snapshot is written and versioned, but committing the offsets failed ({error}); "
            "the next run reads these records again (their rows keep their ids, so the merge "
            "resolves them)"
        ) from error


def topic_partitions(consumer: Any, topics: Sequence[str], wait_s: float = TOPIC_WAIT_S) -> list:
    from kafka.structs import TopicPartition

    deadline = time.monotonic() + wait_s
    found = []
    for topic in topics:
        while not (partitions := consumer.partitions_for_topic(topic)):
            if time.monotonic() > deadline:
                raise snapshot.FeedbackError(
                    f"topic {topic!r} does not exist; `mmops topics` creates the stream's topics"
                )
            time.sleep(0.2)
        found += [TopicPartition(topic, p) for p in sorted(partitions)]
    return found


def read_new(
    consumer: Any, params: Params, timeout_s: float, max_records: int | None
) -> tuple[Collected, dict[tuple[str, int], int]]:
    """Records after the group's offsets, until none arrives for `timeout_s` (or
    `max_records` are in); the offsets that commit exactly the records read."""
    collected = Collected(label_field=params.feedback.label_field)
    positions: dict[tuple[str, int], int] = {}
    taken = 0
    for partition in consumer.assignment():
        consumer.position(partition)  # committed offsets looked up before the idle clock starts
    idle_until = time.monotonic() + timeout_s
    while max_records is None or taken < max_records:
        left = idle_until - time.monotonic()
        if left <= 0:
            break
        polled = consumer.poll(timeout_ms=max(1, int(min(left, 0.5) * 1000)))
        messages = [m for batch in polled.values() for m in batch]
        if messages:
            idle_until = time.monotonic() + timeout_s
        for message in messages[: None if max_records is None else max_records - taken]:
            take(collected, message, params)
            positions[(message.topic, message.partition)] = message.offset + 1
            taken += 1
    return collected, positions


def take(collected: Collected, message: Any, params: Params) -> None:
    """One record of any of the three topics into what the run collected."""
    where = Location(message.topic, message.partition, message.offset, message.timestamp)
    collected.read[message.topic] += 1
    if message.topic == params.stream.output_topic:
        # Anything else there is not a prediction; the serving side owns that topic.
        with suppress(orjson.JSONDecodeError, TypeError):
            collected.add_prediction(orjson.loads(message.value))
        return
    source = "event" if message.topic == params.stream.input_topic else "label"
    try:
        if message.headers and (bad := escaped_keys(message.headers)) is not None:
            raise EventError(f"headers: key {bad} is not UTF-8", "bad_header_key")
        if message.headers and undecodable_batch(message.headers) is not None:
            raise EventError("record batch cannot be decoded", "undecodable_batch")
        if source == "label":
            try:
                value = orjson.loads(message.value or b"null")
            except orjson.JSONDecodeError as error:
                raise EventError(f"value: not JSON ({error.msg})", "not_json") from None
            collected.add_label(value, where)
            return
        cfg = params.stream
        collected.add_event(
            decode_event(message.value, cfg.max_event_bytes, cfg.max_id_chars), where
        )
    except EventError as error:
        key = message.key.decode("utf-8", "replace") if message.key else None
        collected.reject(key, source, error.reason, str(error), where)


def labelled_records(
    rows: Sequence[LabelledEvent], params: Params, kafka: Mapping[str, Any]
) -> tuple[list[tuple[dict[str, Any], bytes | None]], list[Rejection]]:
    """Each labelled event as a manifest record and its image; events not in hand are read
    again from where they lie on the input topic."""
    missing = {row.location: row.id for row in rows if row.event is None}
    fetched = fetch_events(kafka, params, list(missing)) if missing else {}
    records, rejections = [], []
    for row in rows:
        event = row.event if row.event is not None else fetched.get(row.location)
        if event is None or str(event.get("id")) != row.id:
            where = row.location
            detail = (
                f"not found at {where.topic}:{where.partition}@{where.offset} "
                "(past the topic's retention?)"
            )
            rejections.append(Rejection(row.id, "event", "event_gone", detail, row.location))
            continue
        try:
            records.append(snapshot_record(event, row.label, params.feedback.split))
        except ValueError as error:
            rejections.append(Rejection(row.id, "event", "bad_image", str(error), row.location))
    return records, rejections


def fetch_events(
    kafka: Mapping[str, Any], params: Params, locations: Sequence[Location]
) -> dict[Location, dict[str, Any]]:
    """The events at `locations`, read again by offset (a reader outside any group)."""
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    settings = {**consumer_settings(params.stream), "group_id": None}
    reader = KafkaConsumer(**kafka, **{**settings, "auto_offset_reset": "earliest"})
    found: dict[Location, dict[str, Any]] = {}
    wanted: dict[tuple[str, int], dict[int, Location]] = {}
    for loc in locations:
        wanted.setdefault((loc.topic, loc.partition), {})[loc.offset] = loc
    try:
        for (topic, partition), offsets in wanted.items():
            tp = TopicPartition(topic, partition)
            reader.assign([tp])
            for offset in sorted(offsets):
                if offsets[offset] in found:
                    continue  # came with an earlier fetch
                reader.seek(tp, offset)
                for message in _fetch_from(reader, offset, params.stream.client_timeout_s):
                    if message.offset in offsets:
                        try:
                            event = decode_event(message.value, params.stream.max_event_bytes)
                        except EventError:
                            continue
                        found[offsets[message.offset]] = event
    finally:
        reader.close()
    return found


def _fetch_from(reader: Any, offset: int, timeout_s: float) -> list[Any]:
    """Records from the reader's position until one at or past `offset` (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    got: list[Any] = []
    while time.monotonic() < deadline:
        batch = [m for ms in reader.poll(timeout_ms=200).values() for m in ms]
        got += batch
        if any(m.offset >= offset for m in batch):
            break
    return got
