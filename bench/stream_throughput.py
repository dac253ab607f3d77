"""The Kafka consumer against the raw predictor and a naive consumer, same events, one run.

Starts its own broker (Tansu) on a free port and measures, on events built from the dataset
(base64 images, as the contract has them):

- raw: `Predictor.predict_batch` on the decoded events in chunks of `stream.max_batch`, one call
  after another, no broker, with the `predict` settings as they are (all cores to each call);
- stream: `StreamServer` (what `mmops serve` runs, `stream.workers` batches predicted at once)
  draining a topic of pre-produced events, from its first batch to its last commit: events/s;
- latency: a consumer fed at 10% and 50% of the measured throughput: p50/p99 from an event's
  send to its prediction in the output topic;
- naive: one event per poll, predict, produce, flush and commit, on the same topic;
- drift: the cost of the drift monitor. Consumers with `drift.enabled` and without, in
  alternating rounds, drain the same pre-produced topic: events/s from first batch to last
  commit, on vs off. The version's detectors are calibrated once first (the consumers copy
  that calibration, as a long-running one serves after its first seconds); with the
  calibration time, the events the monitor watched and the batches it skipped.

Raw, stream and naive rounds run without the drift monitor (its start-up calibration would
otherwise share the cores with the first seconds of a short run); the drift rounds measure it.

Rounds alternate, so machine noise hits each alike; medians are reported.

Prints one JSON line with the figures and the ratios stream/raw, stream/naive and drift on/off:

    python bench/stream_throughput.py [--model models:/mmops-classifier@champion] [--data data/demo]
        [--events 2000] [--naive-events 500]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from statistics import median
from typing import Any

from mmops.config import Params, load_params
from mmops.data.dataset import load_splits
from mmops.local.stack import LOOPBACK, create_topics, free_port, start_broker
from mmops.serving.predictor import Predictor
from mmops.stream.drift import calibrated_monitor
from mmops.stream.events import decode_event
from mmops.stream.replay import dataset_events, replay
from mmops.stream.server import StreamServer

LOAD_SHARES = (0.1, 0.5)  # latency is measured with events sent at these shares of throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models:/mmops-classifier@champion")
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--naive-events", type=int, default=500)
    parser.add_argument("--latency-events", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="params override, key=value")
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:6]
    params = load_params(
        args.params if args.params.is_file() else None,
        [*args.set, f"stream.group_id=bench-{tag}", "stream.metrics_port=0"],
    )
    monitored = params
    params = replace(params, drift=replace(params.drift, enabled=False))
    cfg = params.stream
    rows = load_splits(args.data, params).to_dict("records")
    base = dataset_events(rows, args.data)
    events = [{**base[i % len(base)], "id": f"bench-{i}"} for i in range(args.events)]
    values = [json.dumps(e).encode() for e in events]
    predictor = Predictor.load(args.model, params.predict.backend, params.predict)

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        broker = start_broker(port, Path(tmp) / "broker.log")
        kafka = {"bootstrap_servers": f"{LOOPBACK}:{port}"}
        try:
            create_topics(
                kafka["bootstrap_servers"],
                [cfg.input_topic, cfg.output_topic, cfg.dead_letter_topic, "naive.out"],
                cfg.partitions,
            )
            produce(kafka, cfg.input_topic, values)
            # Rounds alternate so that machine noise hits both alike; each stream round is a
            # fresh consumer group draining the same pre-produced topic.
            raw, stream, naive = [], [], []
            for round_ in range(args.rounds):
                raw.append(raw_throughput(predictor, values, cfg.max_batch))
                stream.append(stream_throughput(params, args.model, kafka, len(values), round_))
                naive.append(
                    naive_throughput(
                        predictor, kafka, cfg.input_topic, args.naive_events, f"{tag}-{round_}"
                    )
                )
            latency = stream_latency(params, args.model, kafka, events, median(stream), args)
            drift = drift_cost(monitored, args.model, kafka, values, args.rounds)
        finally:
            broker.kill()
            broker.wait()

    print(
        json.dumps(
            {
                "events": args.events,
                "rounds": args.rounds,
                "max_batch": cfg.max_batch,
                "max_wait_ms": cfg.max_wait_ms,
                "workers": cfg.workers,
                "backend": predictor.backend,
                "events_per_s": {
                    "stream": round(median(stream), 1),
                    "raw_predict_batch": round(median(raw), 1),
                    "naive_consumer": round(median(naive), 1),
                    "stream_rounds": [round(x, 1) for x in stream],
                    "raw_rounds": [round(x, 1) for x in raw],
                    "naive_rounds": [round(x, 1) for x in naive],
                },
                "latency_ms": latency,
                "stream_vs_raw": round(median(stream) / median(raw), 3),
                "stream_vs_naive": round(median(stream) / median(naive), 2),
                # Each round's three figures were measured back to back: the same noise.
                "stream_vs_raw_rounds": [round(x / y, 3) for x, y in zip(stream, raw, strict=True)],
                "stream_vs_naive_rounds": [
                    round(x / y, 2) for x, y in zip(stream, naive, strict=True)
                ],
                "drift": drift,
            }
        )
    )


def raw_throughput(predictor: Predictor, values: list[bytes], size: int) -> float:
    """Events/s of predict_batch alone on the decoded events, in micro-batches."""
    records = [decode_event(v, 1 << 30) for v in values]
    predictor.predict_batch(records[:size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(records), size):
        predictor.predict_batch(records[i : i + size])
    return len(records) / (time.perf_counter() - start)


def produce(kafka: dict[str, Any], topic: str, values: list[bytes]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(**kafka, linger_ms=5)
    for value in values:
        producer.send(topic, value)
    producer.flush()
    producer.close()


def stream_throughput(
    params: Params, model: str, kafka: dict[str, Any], count: int, round_: int
) -> float:
    """Events/s of a fresh consumer draining the topic, from its first batch to its last commit."""
    params = replace(
        params, stream=replace(params.stream, group_id=f"{params.stream.group_id}-{round_}")
    )
    server = StreamServer(params, model, kafka)
    stats = server.run(max_events=count)
    if stats.events < count or stats.first_event_at is None or stats.last_commit_at is None:
        raise SystemExit(f"the consumer served {stats.events} of {count} events")
    return stats.events / (stats.last_commit_at - stats.first_event_at)


def stream_latency(
    params: Params, model: str, kafka: dict[str, Any], events: list[dict], rate: float, args: Any
) -> dict[str, dict[str, float]]:
    """Send-to-prediction latency of a running consumer fed at shares of its throughput."""
    stream = replace(params.stream, auto_offset_reset="latest", group_id="latency")
    params = replace(params, stream=stream)
    server = StreamServer(params, model, kafka)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not (server.consumer and server.consumer.assignment()):
        time.sleep(0.1)  # joined the group: events sent now are served as they come
    figures = {}
    for share in LOAD_SHARES:
        paced = [{**e, "id": f"{e['id']}-{share}"} for e in events[: args.latency_events]]
        summary = replay(paced, params.stream, kafka, timeout_s=300, rate=rate * share)
        figures[f"at_{int(share * 100)}pct_load"] = {
            "rate_per_s": round(rate * share, 1),
            "p50": summary.get("latency_ms_p50", float("nan")),
            "p99": summary.get("latency_ms_p99", float("nan")),
            "answered": summary["predicted"],
        }
    server.stop()
    thread.join(timeout=60)
    return figures


def drift_cost(
    params: Params, model: str, kafka: dict[str, Any], values: list[bytes], rounds: int
) -> dict[str, Any]:
    """Events/s of a consumer with the drift monitor vs one without, alternating rounds, each
    draining the same pre-produced events; the monitor calibrated once beforehand, as a
    long-running consumer is after its first seconds (its calibration time is reported)."""
    predictor = Predictor.load(model, params.predict.backend, params.predict)
    if predictor.references is None:
        raise SystemExit(f"{model} has no reference embeddings: export it again")
    identity = predictor.identity
    start = time.perf_counter()
    calibrated_monitor(predictor.references, params.drift, identity.name, identity.version)
    calibration_s = time.perf_counter() - start
    topic = f"drift-cost-{uuid.uuid4().hex[:6]}"
    create_topics(kafka["bootstrap_servers"], [topic, params.drift.topic], params.stream.partitions)
    produce(kafka, topic, values)
    on, off, watched, skipped = [], [], [], []
    for round_ in range(rounds):
        for enabled in (True, False):
            drift = replace(params.drift, enabled=enabled)
            group = f"{topic}-{int(enabled)}-{round_}"
            stream = replace(params.stream, input_topic=topic, group_id=group)
            server = StreamServer(replace(params, stream=stream, drift=drift), model, kafka)
            stats = server.run(max_events=len(values))
            if stats.first_event_at is None or stats.last_commit_at is None:
                raise SystemExit(f"the consumer served {stats.events} of {len(values)} events")
            rate = stats.events / (stats.last_commit_at - stats.first_event_at)
            (on if enabled else off).append(rate)
            if server.drift is not None:
                monitor = server.drift.monitor
                watched.append(monitor.events if monitor is not None else 0)
                counter = server.metrics.registry.get_sample_value(
                    "mmops_drift_skipped_batches_total"
                )
                skipped.append(int(counter or 0))
    return {
        "events_per_s_on": round(median(on), 1),
        "events_per_s_off": round(median(off), 1),
        "on_vs_off": round(median(on) / median(off), 3),
        "on_vs_off_rounds": [round(x / y, 3) for x, y in zip(on, off, strict=True)],
        "calibration_s": round(calibration_s, 1),
        "watched_events": watched,
        "skipped_batches": skipped,
    }


def naive_throughput(
    predictor: Predictor, kafka: dict[str, Any], topic: str, count: int, tag: str
) -> float:
    """The baseline: one event per poll, predicted, produced, flushed and committed alone."""
    from kafka import KafkaConsumer, KafkaProducer

    consumer = KafkaConsumer(
        topic,
        **kafka,
        group_id=f"naive-{tag}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
    )
    producer = KafkaProducer(**kafka)
    served, start = 0, None
    while served < count:
        for messages in consumer.poll(timeout_ms=200, max_records=1).values():
            for message in messages:
                start = start or time.perf_counter()
                [result] = predictor.predict_batch([decode_event(message.value, 1 << 30)])
                producer.send("naive.out", json.dumps(result).encode())
                producer.flush()
                consumer.commit()
                served += 1
    elapsed = time.perf_counter() - start
    consumer.close()
    producer.close()
    return (served - 1) / elapsed  # the clock starts at the first event


if __name__ == "__main__":
    main()
