"""The Kafka consumer against a real broker (Tansu) and a real MLflow registry (SQLite in tmp)."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition
from PIL import Image

from mmops.config import Params, load_params
from mmops.data.dataset import load_splits
from mmops.local.stack import LOOPBACK, create_topics, free_port, start_broker
from mmops.stream.replay import dataset_events
from mmops.stream.server import StreamServer
from mmops.tracking import registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MMOPS = str(Path(sys.executable).parent / "mmops")
MODEL = "mmops-stream-test"
PARTITIONS = 2


@dataclass(frozen=True)
class Registered:
    workdir: Path
    tracking_uri: str
    events: list[dict[str, Any]]  # valid events from the demo data, ids unique


@dataclass(frozen=True)
class Topics:
    overrides: tuple[str, ...]
    params: Params
    input: str
    output: str
    dead: str


def set_args(overrides: tuple[str, ...]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen]:
    port = free_port()
    process = start_broker(port, tmp_path_factory.mktemp("broker") / "broker.log")
    process.bootstrap = f"{LOOPBACK}:{port}"  # type: ignore[attr-defined]
    yield process
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def bootstrap(broker: subprocess.Popen) -> str:
    return broker.bootstrap  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def registered(
    demo_dir: Path,
    train_and_export: Callable[..., tuple[str, dict[str, str]]],
    tmp_path_factory: pytest.TempPathFactory,
    mlflow_store: Callable[..., AbstractContextManager[str]],
) -> Iterator[Registered]:
    """A tiny model trained and exported once, registered as v1 (champion) and v2."""
    workdir = tmp_path_factory.mktemp("stream")
    with mlflow_store(workdir) as uri:
        _, exported = train_and_export("train.epochs=4", "train.lr=0.003")
        serving_uri = exported["model_uri"]
        registry.register(serving_uri, MODEL, {})
        # A second version of the same model for swap tests: registry.register is idempotent
        # for a model URI, so it is registered directly.
        mlflow.register_model(serving_uri, MODEL)
        registry.promote(MODEL, "1", "first champion")
        rows = load_splits(demo_dir, load_params()).to_dict("records")
        yield Registered(workdir, uri, dataset_events(rows, demo_dir))


@pytest.fixture
def topics(bootstrap: str, registered: Registered) -> Topics:
    """Fresh topics and a fresh group for one test."""
    tag = uuid.uuid4().hex[:8]
    names = (f"events-{tag}", f"predictions-{tag}", f"dlq-{tag}")
    create_topics(bootstrap, names, PARTITIONS)
    overrides = (
        f"stream.input_topic={names[0]}",
        f"stream.output_topic={names[1]}",
        f"stream.dead_letter_topic={names[2]}",
        f"stream.group_id=serve-{tag}",
        f"tracking.registered_model={MODEL}",
        "stream.max_batch=16",
        "stream.model_poll_s=0.3",
        "stream.session_timeout_ms=6000",
        "stream.metrics_port=0",
    )
    return Topics(overrides, load_params(None, overrides), *names)


@pytest.fixture
def serving(topics: Topics, bootstrap: str) -> Iterator[Callable[..., StreamServer]]:
    """Start in-process consumers following the champion; all are stopped after the test."""
    started: list[tuple[StreamServer, threading.Thread]] = []
    crashed: list[BaseException] = []

    def start(params: Params | None = None) -> StreamServer:
        server = StreamServer(params or topics.params, kafka={"bootstrap_servers": bootstrap})

        def run() -> None:
            try:
                server.run()
            except BaseException as error:
                crashed.append(error)
                raise

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.stop()
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert not crashed, crashed


def produce(bootstrap: str, topic: str, values: list[bytes | None], keys: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for key, value in zip(keys, values, strict=True):
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def paced_sender(
    bootstrap: str, topic: str, events: list[dict[str, Any]], interval: float
) -> threading.Thread:
    """A thread (not started) that sends `events` one every `interval` seconds."""

    def send() -> None:
        producer = KafkaProducer(bootstrap_servers=bootstrap)
        for event in events:
            producer.send(topic, encode(event))
            time.sleep(interval)
        producer.flush()
        producer.close()

    return threading.Thread(target=send)


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def read_topic(
    bootstrap: str,
    topic: str,
    done: Callable[[list[Any]], bool],
    timeout: float = 90,
    settle: float = 1.5,
) -> list[Any]:
    """Messages from the start of `topic` until `done`, then `settle` seconds more (duplicates)."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=20
    )
    partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    messages: list[Any] = []
    deadline = time.monotonic() + timeout
    while not done(messages) and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            messages.extend(batch)
    end = time.monotonic() + settle
    while time.monotonic() < end:
        for batch in consumer.poll(timeout_ms=200).values():
            messages.extend(batch)
    consumer.close()
    return messages


def ids_of(messages: list[Any]) -> list[str]:
    return [json.loads(m.value)["id"] for m in messages]


def covers(ids: set[str]) -> Callable[[list[Any]], bool]:
    return lambda messages: ids <= set(ids_of(messages))


def test_n_events_in_n_distinct_predictions_out(
    registered: Registered, topics: Topics, bootstrap: str, serving: Callable[..., StreamServer]
) -> None:
    events = [{**e, "seq": i} for i, e in enumerate(registered.events[:150])]
    produce(bootstrap, topics.input, [encode(e) for e in events], [b"k"] * len(events))
    server = serving()
    sent = {e["id"] for e in events}

    out = read_topic(bootstrap, topics.output, covers(sent))

    assert sorted(ids_of(out)) == sorted(sent)  # each exactly once
    by_id = {e["id"]: e for e in events}
    for message in out:
        value = json.loads(message.value)
        assert message.key == value["id"].encode()
        assert value["model"] == {"name": MODEL, "version": "1"}
        assert abs(sum(value["scores"].values()) - 1) < 1e-4
        assert value["label"] == max(value["scores"], key=value["scores"].get)
        assert value["seq"] == by_id[value["id"]]["seq"]  # extra fields pass through
        assert value["truth"] == by_id[value["id"]]["truth"]
        assert value["latency_ms"] >= 0 and value["ts"] > 0
    metrics = server.metrics.registry
    assert metrics.get_sample_value("mmops_stream_events_total", {"outcome": "predicted"}) == 150
    backend = server.models.current.backend
    info = {"name": MODEL, "version": "1", "backend": backend}
    assert metrics.get_sample_value("mmops_stream_model_info", info) == 1
    assert metrics.get_sample_value("mmops_stream_end_to_end_seconds_count") == 150


def as_jpeg(event: dict[str, Any]) -> dict[str, Any]:
    """The event with its image re-encoded as a JPEG, as cameras and phones send them."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(base64.b64decode(event["image"]))).convert("RGB").save(
        buffer, "JPEG", quality=90
    )
    return {**event, "image": base64.b64encode(buffer.getvalue()).decode()}


def test_a_pretrained_dual_encoder_registered_as_champion_serves_jpeg_events(
    registered: Registered,
    clip_run: Any,
    demo_dir: Path,
    topics: Topics,
    bootstrap: str,
    serving: Callable[..., StreamServer],
    tmp_path: Path,
) -> None:
    """A CLIP-backbone model, exported through the parity gate, registered and promoted, serves
    JPEG events through the broker: one prediction each, from that version, with the labels
    its exported model gives the same events outside the stream."""
    from mmops.serving.predictor import Predictor
    from mmops.tracking.export_run import tracked_export

    params, trained = clip_run
    name = f"{MODEL}-clip"
    report, _, uri = tracked_export(str(trained.model_dir), demo_dir, params, tmp_path / "export")
    assert report.gates.fp32.passed, report.gates.fp32.reasons
    version = registry.register(uri, name, {})
    registry.promote(name, version, "first champion")
    events = [as_jpeg(e) for e in registered.events[:60]]
    produce(bootstrap, topics.input, [encode(e) for e in events], [b"k"] * len(events))
    serving(load_params(None, (*topics.overrides, f"tracking.registered_model={name}")))
    sent = {e["id"] for e in events}

    out = read_topic(bootstrap, topics.output, covers(sent))

    assert sorted(ids_of(out)) == sorted(sent)
    expected = {
        e["id"]: p["label"]
        for e, p in zip(events, Predictor(tmp_path / "export").predict_batch(events), strict=True)
    }
    for message in out:
        value = json.loads(message.value)
        assert value["model"] == {"name": name, "version": version}
        assert value["label"] == expected[value["id"]]
    assert read_topic(bootstrap, topics.dead, lambda m: False, timeout=0.5) == []


def png(size: tuple[int, int], noise: bool = False, mode: str = "RGB") -> bytes:
    if noise:
        image = Image.frombytes("RGB", size, random.Random(0).randbytes(size[0] * size[1] * 3))
    else:
        image = Image.new(mode, size, "white")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_with_a_garbage_chunk() -> bytes:
    """A PNG with a chunk of type 00 ff 01 02 between its image data: Pillow raises SyntaxError."""
    data = png((64, 64))

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    start = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[start : start + 4])
    pixels = data[start + 8 : start + 8 + length]
    middle = chunk(b"IDAT", pixels[: length // 2]) + chunk(b"\x00\xff\x01\x02", b"junk")
    middle += chunk(b"IDAT", pixels[length // 2 :])
    return data[:start] + middle + data[start + 12 + length :]


def nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = {"a": value}
    return value


def poison_corpus(good: dict[str, Any]) -> list[tuple[bytes | None, str]]:
    """(value, expected reason) for every kind of bad event the contract names."""
    bomb = png((6000, 6000), mode="L")  # tens of KB of PNG, 36 M pixels once decoded
    assert len(bomb) < 100_000
    big = png((300, 300), noise=True)  # over predict.max_image_bytes=100000 below
    assert len(big) > 100_000
    event = {k: good[k] for k in ("text", "image")}
    return [
        (b"\x00\x01 not json", "not_json"),
        (b'{"id": "trunc', "not_json"),
        (b"\xff\xfe\xfd", "not_utf8"),
        (b"[1, 2, 3]", "not_object"),
        (b'"a string"', "not_object"),
        (None, "null_value"),
        (encode(event), "missing_field"),
        (encode({**event, "id": 12}), "wrong_type"),
        (encode({"id": "p-no-image", "text": "hello"}), "missing_field"),
        (encode({"id": "p-img-type", "text": "t", "image": 7}), "wrong_type"),
        (encode({"id": "p-text-type", "text": ["t"], "image": None}), "wrong_type"),
        (encode({"id": "p-neither", "text": None, "image": None}), "missing_field"),
        (encode({"id": "p-not-b64", "text": "t", "image": "images/x.png"}), "image_not_base64"),
        (
            encode({"id": "p-garbage", "text": "t", "image": b64(b"not an image")}),
            "image_undecodable",
        ),
        (
            encode({"id": "p-truncated", "text": "t", "image": b64(png((64, 64))[:60])}),
            "image_undecodable",
        ),
        (encode({"id": "p-bomb", "text": "t", "image": b64(bomb)}), "image_too_many_pixels"),
        (encode({"id": "p-big", "text": "t", "image": b64(big)}), "image_too_large"),
        (encode({"id": "p-long-text", "text": "x" * 1001, "image": None}), "text_too_long"),
        (encode({"id": "p-huge", "text": "x" * 600_000, "image": None}), "event_too_large"),
        (
            encode({"id": "p-chunk", "text": "t", "image": b64(png_with_a_garbage_chunk())}),
            "image_undecodable",
        ),
        (encode({**event, "id": "p-nested", "extra": nested(300)}), "unserialisable"),
        (encode({**event, "id": "p" * 2000}), "id_too_long"),
    ]


def test_poison_events_go_to_the_dlq_and_the_stream_goes_on(
    registered: Registered, topics: Topics, bootstrap: str, serving: Callable[..., StreamServer]
) -> None:
    good = registered.events[:60]
    corpus = poison_corpus(good[0])
    values: list[bytes | None] = []
    expected: dict[int, str] = {}  # position in the input -> reason
    for i, event in enumerate(good):
        values.append(encode(event))
        if i < len(corpus):
            expected[len(values)] = corpus[i][1]
            values.append(corpus[i][0])
    keys = [f"k{i}".encode() for i in range(len(values))]
    params = load_params(
        None, (*topics.overrides, "predict.max_image_bytes=100000", "stream.max_event_bytes=500000")
    )
    produce(bootstrap, topics.input, values, keys)
    server = serving(params)

    out = read_topic(bootstrap, topics.output, covers({e["id"] for e in good}))
    dead = read_topic(bootstrap, topics.dead, lambda m: len(m) >= len(corpus))

    assert sorted(ids_of(out)) == sorted(e["id"] for e in good)
    assert len(dead) == len(corpus)
    reasons = Counter(dict(m.headers)["mmops.error.reason"].decode() for m in dead)
    assert reasons == Counter(expected.values())
    for message in dead:
        headers = dict(message.headers)
        position = int(message.key.decode()[1:])
        assert headers["mmops.error.reason"].decode() == expected[position]
        if expected[position] == "event_too_large":  # a small record: a prefix, its length
            assert message.value == values[position][:1024]
            assert headers["mmops.value.truncated"] == str(len(values[position])).encode()
        else:
            assert message.value == values[position]  # the original bytes, untouched
        assert headers["mmops.source.topic"].decode() == topics.input
        assert headers["mmops.error.message"]
        source = (int(headers["mmops.source.partition"]), int(headers["mmops.source.offset"]))
        assert source in _offsets(bootstrap, topics.input)[message.key]
    metrics = server.metrics.registry
    assert metrics.get_sample_value("mmops_stream_dead_letters_total", {"reason": "not_json"}) == 2


def test_events_over_the_clients_default_size_are_served(
    registered: Registered, topics: Topics, bootstrap: str, serving: Callable[..., StreamServer]
) -> None:
    """Events up to stream.max_event_bytes (16 MB), past kafka-python's 1 MiB defaults."""
    big_image = {**registered.events[0], "id": "big-image", "image": b64(png((900, 900), True))}
    values = [b"\x00not json" * 200_000, encode(big_image), encode(registered.events[1])]
    assert all(len(v) > 1 << 20 for v in values[:2])
    producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=8 << 20)
    for key, value in zip([b"a", b"b", b"c"], values, strict=True):
        producer.send(topics.input, key=key, value=value)
    producer.flush()
    producer.close()
    serving()

    out = read_topic(bootstrap, topics.output, covers({"big-image", registered.events[1]["id"]}))
    dead = read_topic(bootstrap, topics.dead, lambda m: len(m) >= 1)

    assert sorted(ids_of(out)) == sorted(["big-image", registered.events[1]["id"]])
    [letter] = dead
    assert letter.value == values[0]
    assert dict(letter.headers)["mmops.error.reason"] == b"not_json"


def _offsets(bootstrap: str, topic: str) -> dict[bytes, set[tuple[int, int]]]:
    found: dict[bytes, set[tuple[int, int]]] = {}
    for message in read_topic(bootstrap, topic, lambda m: False, timeout=2, settle=0):
        found.setdefault(message.key, set()).add((message.partition, message.offset))
    return found


def test_champion_swap_mid_stream_serves_each_event_once(
    registered: Registered, topics: Topics, bootstrap: str, serving: Callable[..., StreamServer]
) -> None:
    events = registered.events[:240]
    server = serving()

    # 240 events over ~10 s: a promotion (which waits out the registry lease) lands mid-stream.
    sender = paced_sender(bootstrap, topics.input, events, 0.04)
    sender.start()
    read_topic(bootstrap, topics.output, lambda m: len(m) >= 40, settle=0)
    registry.promote(MODEL, "2", "swap test")
    sender.join()
    out = read_topic(bootstrap, topics.output, covers({e["id"] for e in events}))
    registry.promote(MODEL, "1", "restore")

    assert sorted(ids_of(out)) == sorted(e["id"] for e in events)
    values = sorted((json.loads(m.value) for m in out), key=lambda v: v["ts"])
    versions = [v["model"]["version"] for v in values]
    assert versions[0] == "1" and versions[-1] == "2"
    assert versions == sorted(versions)  # once v2 serves, v1 never does again
    assert server.stats.versions == ["1", "2"]
    assert server.metrics.registry.get_sample_value("mmops_stream_model_swaps_total") == 1


def wait_for_partitions(server: StreamServer, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (server.consumer is not None and len(server.consumer.assignment()) == count):
        assert time.monotonic() < deadline, f"no {count} partitions assigned in {timeout} s"
        time.sleep(0.2)


def test_consumers_in_one_group_share_the_partitions(
    registered: Registered, topics: Topics, bootstrap: str, serving: Callable[..., StreamServer]
) -> None:
    first, second = serving(), serving()
    for server in (first, second):
        wait_for_partitions(server, 1)
    events = registered.events[:200]
    keys = [e["id"].encode() for e in events]  # spread over both partitions
    produce(bootstrap, topics.input, [encode(e) for e in events], keys)

    out = read_topic(bootstrap, topics.output, covers({e["id"] for e in events}))

    assert sorted(ids_of(out)) == sorted(e["id"] for e in events)
    assert first.stats.events > 0 and second.stats.events > 0  # each served its partition
    assert first.stats.events + second.stats.events == len(events)


def test_a_consumer_joining_mid_stream_loses_nothing(
    registered: Registered, topics: Topics, bootstrap: str, serving: Callable[..., StreamServer]
) -> None:
    """The rebalance revokes partitions while batches are being predicted: those are dropped
    unsent and read again from where they start, by whichever consumer now owns them."""
    events = registered.events[:300]
    first = serving()
    wait_for_partitions(first, PARTITIONS)
    sender = paced_sender(bootstrap, topics.input, events, 0.04)  # no keys: both partitions
    sender.start()
    read_topic(bootstrap, topics.output, lambda m: len(m) >= 40, settle=0)
    second = serving()
    wait_for_partitions(second, 1)
    sender.join()

    out = read_topic(bootstrap, topics.output, covers({e["id"] for e in events}))

    ids = ids_of(out)
    assert set(ids) == {e["id"] for e in events}
    assert len(ids) - len(set(ids)) <= PARTITIONS * 16  # at most a batch per partition again
    assert first.stats.events > 0 and second.stats.events > 0  # the newcomer took a partition


def test_broker_pause_loses_nothing(
    broker: subprocess.Popen,
    registered: Registered,
    topics: Topics,
    bootstrap: str,
    serving: Callable[..., StreamServer],
) -> None:
    events = registered.events[:200]
    produce(bootstrap, topics.input, [encode(e) for e in events], [b"k"] * len(events))
    serving()
    read_topic(bootstrap, topics.output, lambda m: len(m) >= 16, settle=0)
    broker.send_signal(signal.SIGSTOP)  # the broker stops answering, connections stay open
    try:
        time.sleep(4)
    finally:
        broker.send_signal(signal.SIGCONT)

    out = read_topic(bootstrap, topics.output, covers({e["id"] for e in events}))

    assert set(ids_of(out)) == {e["id"] for e in events}


def serve_process(topics: Topics, bootstrap: str, registered: Registered, log: Path) -> Any:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "MLFLOW_TRACKING_URI": registered.tracking_uri,
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [MMOPS, "serve", *set_args(topics.overrides)],
            cwd=registered.workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def test_kill_9_at_random_points_loses_no_event(
    registered: Registered, topics: Topics, bootstrap: str, tmp_path: Path
) -> None:
    events = registered.events[:400]
    rng = random.Random(7)
    log = tmp_path / "serve.log"

    sender = paced_sender(bootstrap, topics.input, events, 0.05)
    process = serve_process(topics, bootstrap, registered, log)
    sender.start()
    kills = 0
    for _ in range(2):
        served = len(read_topic(bootstrap, topics.output, lambda m: False, timeout=1, settle=0))
        # Wait for the (re)started consumer to serve, then kill it at a random moment.
        target = served + 20
        read_topic(bootstrap, topics.output, lambda m, target=target: len(m) > target, settle=0)
        time.sleep(rng.uniform(0, 0.5))
        process.kill()
        process.wait()
        kills += 1
        process = serve_process(topics, bootstrap, registered, log)
    sender.join()
    out = read_topic(bootstrap, topics.output, covers({e["id"] for e in events}), timeout=120)
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=60)

    ids = ids_of(out)
    assert set(ids) == {e["id"] for e in events}, log.read_text()[-3000:]
    duplicates = len(ids) - len(set(ids))
    # At least once: a kill repeats at most the uncommitted batch of each partition.
    assert duplicates <= kills * PARTITIONS * 16
    assert code == 0
    assert '"msg": "stopped"' in log.read_text()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=topics.params.stream.group_id)
    partitions = [TopicPartition(topics.input, p) for p in range(PARTITIONS)]
    ends = consumer.end_offsets(partitions)
    assert {p: consumer.committed(p) for p in partitions} == ends  # graceful stop committed all
    consumer.close()


def test_up_serve_stream_demo_down(registered: Registered, demo_dir: Path, tmp_path: Path) -> None:
    """The README's stream: `mmops up`, `mmops serve`, `mmops stream-demo`, `mmops down`."""
    port, metrics_port, mlflow_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": f"{LOOPBACK}:{port}",
        "MLFLOW_TRACKING_URI": registered.tracking_uri,
    }
    model = (f"tracking.registered_model={MODEL}", "stream.model_poll_s=1")

    def mmops(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [MMOPS, *args, *set_args(model)] if args[0] != "down" else [MMOPS, *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    started = mmops("up", "--mlflow-port", str(mlflow_port))
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{mlflow_port}/health", timeout=10) as r:
            assert r.status == 200
        server = subprocess.Popen(
            [MMOPS, "serve", "--metrics-port", str(metrics_port), *set_args(model)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        report = tmp_path / "stream-demo.json"
        demo = mmops(
            "stream-demo",
            *("--data", str(demo_dir), "--limit", "30", "--timeout", "120"),
            *("--report", str(report), "--json"),
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr
        summary = json.loads(demo.stdout.strip().splitlines()[-1])
        assert summary["predicted"] == summary["sent"] == 30
        assert json.loads(report.read_text()) == summary
        # The main job's closing table: the champion and the events this stream served.
        table = mmops("summary", "--stream-report", str(report))
        assert table.returncode == 0, table.stdout + table.stderr
        assert f"{MODEL} v1" in table.stdout and "30/30 predicted" in table.stdout
        assert summary["versions"] == {f"{MODEL} v1": 30}
        # With --json, stdout is the JSON alone: a line per prediction goes to stderr.
        assert len(demo.stdout.strip().splitlines()) == 1
        assert len(demo.stderr.strip().splitlines()) >= 31
        with urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/metrics") as r:
            metrics = r.read().decode()
        assert 'mmops_stream_events_total{outcome="predicted"} 30.0' in metrics
        server.send_signal(signal.SIGTERM)
        stdout, stderr = server.communicate(timeout=60)
        assert server.returncode == 0, stderr[-2000:]
        assert json.loads(stdout.strip().splitlines()[-1])["predicted"] == 30
        # What infra/local/demo.sh waits for before it sends events.
        assert '"msg": "partitions assigned"' in stderr
    finally:
        stopped = mmops("down")
    assert "broker" in stopped.stdout and "mlflow" in stopped.stdout
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{LOOPBACK}:{mlflow_port}/health", timeout=2)


class RawKey(str):
    """A header key that kafka-python's producer writes as the given bytes, UTF-8 or not."""

    raw: bytes = b""

    def __new__(cls, raw: bytes) -> RawKey:
        key = super().__new__(cls, raw.decode("latin-1"))
        key.raw = raw
        return key

    def encode(self, *args: Any, **kwargs: Any) -> bytes:  # type: ignore[override]
        return self.raw


def test_a_header_key_that_is_not_utf8_is_dead_lettered_and_its_batch_served(
    registered: Registered, topics: Topics, bootstrap: str, serving: Callable[..., StreamServer]
) -> None:
    good = registered.events[:3]
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=50)  # one record batch
    for i, event in enumerate(good):
        headers = [(RawKey(b"\xff\xfe"), b"x")] if i == 1 else [("trace", b"t")]
        producer.send(topics.input, key=b"same", value=encode(event), headers=headers)
    producer.flush()
    producer.close()
    serving()

    out = read_topic(bootstrap, topics.output, covers({good[0]["id"], good[2]["id"]}))
    dead = read_topic(bootstrap, topics.dead, lambda m: len(m) >= 1)

    assert sorted(set(ids_of(out))) == sorted([good[0]["id"], good[2]["id"]])
    [letter] = dead
    assert dict(letter.headers)["mmops.error.reason"] == b"bad_header_key"
    assert letter.value == encode(good[1])


CODECS = ("none", "gzip", "snappy", "lz4", "zstd")


def test_events_compressed_by_librdkafka_with_every_codec_are_served(
    registered: Registered, topics: Topics, bootstrap: str, serving: Callable[..., StreamServer]
) -> None:
    from confluent_kafka import Producer

    events = registered.events[: 4 * len(CODECS)]
    for i, codec in enumerate(CODECS):
        # linger: the events of one codec share a compressed record batch
        producer = Producer(
            {"bootstrap.servers": bootstrap, "compression.type": codec, "linger.ms": 50}
        )
        for event in events[4 * i : 4 * i + 4]:
            producer.produce(topics.input, value=encode(event), key=event["id"].encode())
        assert producer.flush(30) == 0
    serving()

    out = read_topic(bootstrap, topics.output, covers({e["id"] for e in events}))

    assert sorted(set(ids_of(out))) == sorted(e["id"] for e in events)
    assert read_topic(bootstrap, topics.dead, lambda m: False, timeout=0, settle=1) == []


def test_a_batch_that_cannot_be_decoded_is_dead_lettered_and_its_partition_moves_on(
    registered: Registered,
    topics: Topics,
    bootstrap: str,
    serving: Callable[..., StreamServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kafka.record import default_records

    good = registered.events[:9]
    corrupt = [e["id"] for e in registered.events[9:12]]

    def send(events: list[dict[str, Any]], partition: int, compression: str | None = None) -> None:
        producer = KafkaProducer(
            bootstrap_servers=bootstrap, compression_type=compression, linger_ms=50
        )
        sent = [producer.send(topics.input, encode(e), partition=partition) for e in events]
        producer.flush()
        for future in sent:
            future.get(timeout=10)
        producer.close()

    send(good[:3], 0)
    with monkeypatch.context() as patch:  # a producer whose gzip payload is garbage
        patch.setattr(default_records, "gzip_encode", lambda payload, **_: b"not gzip" * 8)
        send(registered.events[9:12], 0, "gzip")
    send(good[3:6], 0)
    send(good[6:], 1)
    serving()

    out = read_topic(bootstrap, topics.output, covers({e["id"] for e in good}))
    dead = read_topic(bootstrap, topics.dead, lambda m: len(m) >= 1, settle=3)

    assert sorted(set(ids_of(out))) == sorted(e["id"] for e in good)
    assert not set(corrupt) & set(ids_of(out))
    covered: list[int] = []
    for letter in dead:  # one per record batch the producer made of the three
        headers = dict(letter.headers)
        assert headers["mmops.error.reason"] == b"undecodable_batch"
        assert headers["mmops.source.partition"] == b"0"
        assert b"gzip" in headers["mmops.error.message"]
        assert b"not gzip" in letter.value  # the batch's bytes as fetched: nothing lost
        first, last = int(headers["mmops.source.first_offset"]), int(headers["mmops.source.offset"])
        covered.extend(range(first, last + 1))
    assert sorted(covered) == [3, 4, 5]


def fuzz_corpus(valid: list[dict[str, Any]], max_bytes: int, rng: random.Random) -> list[Any]:
    """(value, headers, is_valid) events: valid ones interleaved with mutations of them."""
    corpus: list[Any] = []
    for i, event in enumerate(valid):
        corpus.append((encode({**event, "id": f"v{i}"}), [], True))
        for j in range(5):
            kind, mutated = rng.randrange(6), encode({**event, "id": f"m{i}-{j}"})
            headers: list[tuple[str, bytes]] = []
            if kind == 0:  # bytes flipped
                data = bytearray(mutated)
                for _ in range(rng.randint(1, 8)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
                mutated = bytes(data)
            elif kind == 1:  # random bytes
                mutated = rng.randbytes(rng.randint(0, 2000))
            elif kind == 2:  # random nesting, past what JSON parsers and writers take
                depth = rng.randint(1, 1500)
                mutated = mutated[:-1] + b', "x": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"
            elif kind == 3:  # random header keys and values
                for _ in range(rng.randint(1, 4)):
                    key = RawKey(rng.randbytes(rng.randint(0, 12)))
                    headers.append((key, rng.randbytes(rng.randint(0, 64))))
            elif kind == 4:  # random sizes up to and past the limit
                pad = "p" * rng.randint(0, int(max_bytes * 1.2))
                mutated = encode({**event, "id": f"m{i}-{j}", "pad": pad})
            else:  # a field of the wrong type
                mutated = encode({**event, "id": f"m{i}-{j}", "text": rng.choice([1, [], {}])})
            corpus.append((mutated, headers, False))
    return corpus


def produced_count(bootstrap: str, *topics_: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    partitions = [TopicPartition(t, p) for t in topics_ for p in range(PARTITIONS)]
    total = sum(consumer.end_offsets(partitions).values())
    consumer.close()
    return total


def parsed_id(value: bytes | None) -> str | None:
    try:
        event = json.loads(value or b"")
    except (ValueError, RecursionError):
        return None
    return event.get("id") if isinstance(event, dict) and isinstance(event.get("id"), str) else None


def test_fuzzed_events_and_two_kill_9s_lose_nothing_and_stop_nothing(
    registered: Registered, topics: Topics, bootstrap: str, tmp_path: Path
) -> None:
    rng, max_bytes = random.Random(17), 200_000
    corpus = fuzz_corpus(registered.events[:400], max_bytes, rng)
    overrides = (
        *topics.overrides,
        f"stream.max_event_bytes={max_bytes}",
        "stream.max_batch_bytes=400000",
        "predict.max_image_bytes=100000",
    )
    names = (topics.input, topics.output, topics.dead)
    fuzzed = Topics(overrides, load_params(None, overrides), *names)
    log = tmp_path / "serve.log"
    offsets: list[tuple[int, int]] = []

    def send() -> None:
        producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=4 << 20)
        futures = [
            producer.send(topics.input, key=str(i).encode(), value=value, headers=headers)
            for i, (value, headers, _) in enumerate(corpus)
        ]
        producer.flush()
        offsets.extend((f.get().partition, f.get().offset) for f in futures)
        producer.close()

    sender = threading.Thread(target=send)
    process = serve_process(fuzzed, bootstrap, registered, log)
    sender.start()
    for share in (0.2, 0.5):  # kill -9 once a fifth, then half, of the corpus is answered
        while produced_count(bootstrap, topics.output, topics.dead) < share * len(corpus):
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(rng.uniform(0, 0.5))
        process.kill()
        process.wait()
        process = serve_process(fuzzed, bootstrap, registered, log)
    sender.join()
    source = {position: where for position, where in enumerate(offsets)}

    def accounted(messages: list[Any]) -> set[tuple[int, int]]:
        letters = {
            (int(h["mmops.source.partition"]), int(h["mmops.source.offset"]))
            for h in (dict(m.headers) for m in messages if m.topic == topics.dead)
        }
        predicted = {json.loads(m.value)["id"] for m in messages if m.topic == topics.output}
        return letters | {
            source[i] for i, (value, _, _) in enumerate(corpus) if parsed_id(value) in predicted
        }

    everything = set(offsets)
    out: list[Any] = []
    dead: list[Any] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        out = read_topic(bootstrap, topics.output, lambda m: False, timeout=0, settle=0.5)
        dead = read_topic(bootstrap, topics.dead, lambda m: False, timeout=0, settle=0.5)
        if accounted(out + dead) >= everything:
            break
    assert process.poll() is None, log.read_text()[-3000:]  # alive and serving
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=60)

    done = accounted(out + dead)
    assert everything <= done, f"{len(everything - done)} events neither predicted nor dead"
    valid_ids = {f"v{i}" for i in range(400)}
    assert valid_ids <= set(ids_of(out))
    dead_ids = {parsed_id(m.value) for m in dead}
    assert not valid_ids & dead_ids
    assert code == 0
    reasons = Counter(dict(m.headers)["mmops.error.reason"].decode() for m in dead)
    print(
        json.dumps(
            {
                "events": len(corpus),
                "valid": 400,
                "mutated": len(corpus) - 400,
                "predictions": len(out),
                "distinct_predicted": len(set(ids_of(out))),
                "dead_letters": len(dead),
                "reasons": dict(reasons),
                "kills": 2,
            }
        )
    )


def test_loading_a_registered_model_leaves_no_download_behind(
    registered: Registered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    from mmops.serving.predictor import Predictor

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.tracking_uri)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for version in ("1", "2", "1"):  # what a consumer does on each swap
        predictor = Predictor.load(f"models:/{MODEL}/{version}")
        assert predictor.predict_batch([registered.events[0]])[0]["label"]
    assert list(tmp_path.iterdir()) == []
