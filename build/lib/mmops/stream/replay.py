"""A load generator and checker: send dataset rows as events, collect their answers."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmops.config import StreamConfig
from mmops.stream.events import DEAD_LETTER_HEADER


def dataset_events(rows: Sequence[Mapping[str, Any]], root: Path | str) -> list[dict[str, Any]]:
    """Contract events from dataset rows: base64 image, text, and the true label as `truth`."""
    events = []
    for row in rows:
        image = row.get("image")
        encoded = None
        if isinstance(image, str) and image:
            encoded = base64.b64encode((Path(root) / image).read_bytes()).decode()
        text = row.get("text")
        events.append(
            {
                "id": str(row["id"]),
                "text": text if isinstance(text, str) else None,
                "image": encoded,
                "truth": row.get("label"),
            }
        )
    return events


def replay(
    events: Sequence[Mapping[str, Any]],
    cfg: StreamConfig,
    kafka: dict[str, Any],
    timeout_s: float = 120.0,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    rate: float | None = None,
) -> dict[str, Any]:
    """Send `events` (at `rate` per second, else at once) and collect their answers.

    Reads the output and dead-letter topics from their current end, so a running consumer's
    answers to these events are what it sees; returns counts, accuracy against `truth` when the
    events carry it, and end-to-end latency (send to prediction produced).
    """
    from kafka import KafkaConsumer, KafkaProducer

    reader = KafkaConsumer(**kafka, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=20)
    producer = KafkaProducer(**kafka, linger_ms=5)
    try:
        partitions = _topic_partitions(reader, (cfg.output_topic, cfg.dead_letter_topic))
        reader.assign(partitions)
        reader.seek_to_end(*partitions)
        for partition in partitions:  # fix the end before sending
            reader.position(partition)
        wanted = {str(e["id"]) for e in events}
        start = time.monotonic()
        for i, event in enumerate(events):
            if rate:
                time.sleep(max(0.0, start + i / rate - time.monotonic()))
            value = {**event, "ts": int(time.time() * 1000)}
            producer.send(
                cfg.input_topic, key=str(event["id"]).encode(), value=json.dumps(value).encode()
            )
        producer.flush()
        results: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while wanted - results.keys() and time.monotonic() < deadline:
            for messages in reader.poll(timeout_ms=200).values():
                for message in messages:
                    result = _replay_result(message, cfg)
                    if result is None or result["id"] not in wanted or result["id"] in results:
                        continue
                    results[result["id"]] = result
                    if on_result is not None:
                        on_result(result)
    finally:
        producer.close(timeout=10)
        reader.close()
    return _replay_summary(events, results)


def _topic_partitions(consumer: Any, topics: Sequence[str], timeout_s: float = 30) -> list[Any]:
    from kafka.structs import TopicPartition

    deadline = time.monotonic() + timeout_s
    found: list[Any] = []
    for topic in topics:
        while not (partitions := consumer.partitions_for_topic(topic)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {topic!r} does not exist (`mmops up` creates it)")
            time.sleep(0.2)
        found += [TopicPartition(topic, p) for p in sorted(partitions)]
    return found


def _replay_result(message: Any, cfg: StreamConfig) -> dict[str, Any] | None:
    try:
        value = json.loads(message.value)
    except (TypeError, ValueError):
        return None
    if not isinstance(value, dict) or "id" not in value:
        return None
    if message.topic == cfg.dead_letter_topic:
        headers = {k: v.decode(errors="replace") for k, v in message.headers or []}
        return {
            "id": str(value["id"]),
            "error": headers.get(DEAD_LETTER_HEADER + "error.message", "?"),
            "reason": headers.get(DEAD_LETTER_HEADER + "error.reason", "?"),
            "sent_ts": value.get("ts"),
        }
    value["arrived_ms"] = message.timestamp
    return value


def _replay_summary(
    events: Sequence[Mapping[str, Any]], results: Mapping[str, dict[str, Any]]
) -> dict[str, Any]:
    predicted = [r for r in results.values() if "label" in r]
    latencies = [r["arrived_ms"] - r["event_ts"] for r in predicted if "event_ts" in r]
    judged = [r for r in predicted if r.get("truth") is not None]
    versions: dict[str, int] = {}
    for r in predicted:
        key = f"{r['model']['name']} v{r['model']['version']}"
        versions[key] = versions.get(key, 0) + 1
    summary: dict[str, Any] = {
        "sent": len(events),
        "predicted": len(predicted),
        "dead_letters": len(results) - len(predicted),
        "missing": len(events) - len(results),
        "versions": versions,
    }
    if judged:
        correct = sum(r["label"] == r["truth"] for r in judged)
        summary["accuracy"] = round(correct / len(judged), 4)
    if latencies:
        summary["latency_ms_p50"] = float(np.percentile(latencies, 50))
        summary["latency_ms_p99"] = float(np.percentile(latencies, 99))
    return summary
