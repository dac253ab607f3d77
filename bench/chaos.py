"""Faults injected into the real services around `mmops serve`, counted by event id.

Each stream fault starts its own broker (Tansu) on a free port, a real `mmops serve` subprocess
on a tiny model folder, a producer that records which event ids the broker acknowledged and a
collector that reads every prediction, then injects the fault by signalling real processes:

    broker_kill_busy    the broker SIGKILLed while events flow, restarted on its address
    broker_kill_idle    the same while the consumer is idle
    broker_outage_long  the broker away longer than the group's session timeout
    consumer_sigstop    the consumer paused (SIGSTOP) past the session timeout, then SIGCONT
    foreign_codecs      events from librdkafka (confluent-kafka) in every Kafka codec

Per fault: `produced` (ids the broker acknowledged), `served` (distinct ids predicted),
`duplicates`, `lost` (produced, never served, not lost by the broker itself), `broker_lost`
(acknowledged by a memory-mode broker before it was killed and gone with it: reported apart),
`recovery_s` (from the service's return to the first prediction after it) and `clear_error`
(the consumer's log named the cause in an mmops line, and /healthz ended 200).

Prints one JSON line:

    python bench/chaos.py [--outage-s 20] [--faults broker_kill_busy,consumer_sigstop]

`tests/faults/test_stream_faults.py` runs the same faults with short outages.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmops.config import load_params
from mmops.local.stack import LOOPBACK, create_topics, free_port, start_broker, wait_for_port

MMOPS = str(Path(sys.executable).parent / "mmops")
PARTITIONS = 2
# A model of a few tens of thousands of parameters: the faults are about the clients.
TINY_MODEL = (
    "model.vision.patch_size=16",
    "model.vision.hidden_size=32",
    "model.vision.num_hidden_layers=1",
    "model.vision.num_attention_heads=2",
    "model.vision.intermediate_size=64",
    "model.text.hidden_size=32",
    "model.text.num_hidden_layers=1",
    "model.text.num_attention_heads=2",
    "model.text.intermediate_size=64",
    "model.hidden_dim=32",
    "model.fusion_layers=1",
    "model.fusion_heads=2",
    "model.vision.channels=8",
)
# What the consumer logs when it meets each kind of fault (its own lines, not the client's).
BROKER_LINES = (
    "cannot reach the Kafka brokers",
    "producer cannot recover; replacing it",
    "consumer keeps failing; replacing it",
    "sends not acknowledged",
    "broker error; retrying the batch",
)


def tiny_model(folder: Path) -> Path:
    """An untrained tiny model folder: what serves does not matter here, only that it serves."""
    from mmops.model.classifier import MultimodalClassifier, build_encoders
    from mmops.model.preprocess import train_tokenizer
    from mmops.model.storage import save_model

    config = load_params(None, TINY_MODEL).model
    tokenizer = train_tokenizer(["what colour is the shape"] * 5, vocab_size=64, max_length=16)
    vision, text = build_encoders(config, len(tokenizer))
    model = MultimodalClassifier(config, 3, vision, text)
    return save_model(model, tokenizer, ["red", "green", "blue"], folder)


def event(event_id: str) -> bytes:
    image = Image.new("RGB", (32, 32), (hash(event_id) % 256, 90, 40))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    value = {"id": event_id, "text": "a red square", "image": base64.b64encode(buffer.getvalue())}
    return json.dumps({**value, "image": value["image"].decode()}).encode()


class Broker:
    """A Tansu broker on a fixed port: killed and started again on the same address."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.bootstrap = f"{LOOPBACK}:{self.port}"
        self.log = workdir / "broker.log"
        self.process: subprocess.Popen | None = None
        self.topics: tuple[str, ...] = ()

    def start(self) -> None:
        self.process = start_broker(self.port, self.log)
        if self.topics:  # memory storage: a restarted broker has none
            create_topics(self.bootstrap, self.topics, PARTITIONS)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


class Producer:
    """Sends events with unique ids, paced; `acked` holds those the broker acknowledged (and
    when). Not idempotent: its own producer must not stall on the broker's restart either."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        self.client = KafkaProducer(
            bootstrap_servers=bootstrap,
            enable_idempotence=False,
            linger_ms=5,
            max_block_ms=2000,
            request_timeout_ms=3000,
            delivery_timeout_ms=6000,
            reconnect_backoff_max_ms=500,
        )
        self.acked: dict[str, float] = {}
        self.failed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._count = 0

    def send(self, count: int, prefix: str) -> None:
        for _ in range(count):
            self._send_one(prefix)
        self.client.flush(timeout=10)

    def _send_one(self, prefix: str) -> None:
        event_id = f"{prefix}-{self._count}"
        self._count += 1
        try:
            future = self.client.send(self.topic, event(event_id))
        except Exception:
            self.failed += 1
            return
        future.add_callback(lambda _, i=event_id: self._ack(i))
        future.add_errback(lambda _: self._fail())

    def _ack(self, event_id: str) -> None:
        with self._lock:
            self.acked[event_id] = time.monotonic()

    def _fail(self) -> None:
        with self._lock:
            self.failed += 1

    def pace(self, per_s: float, prefix: str = "e") -> None:
        """Send one event every 1/per_s seconds on a thread until `stop`."""

        def run() -> None:
            while not self._stop.wait(1 / per_s):
                self._send_one(prefix)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def halt(self) -> None:
        """Stop pacing."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def stop(self) -> None:
        self.halt()
        try:
            self.client.flush(timeout=10)
        finally:
            self.client.close(timeout=5)

    def ids(self) -> dict[str, float]:
        with self._lock:
            return dict(self.acked)


class Collector:
    """Reads the prediction topic on a thread, across broker restarts: every id and the time
    it was first seen."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.seen: Counter[str] = Counter()
        self.first_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            group_id=f"collector-{uuid.uuid4().hex[:6]}",
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
            reconnect_backoff_max_ms=500,
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
        )
        while not self._stop.is_set():
            try:
                polled = consumer.poll(timeout_ms=200)
            except Exception:
                time.sleep(0.2)
                continue
            now = time.monotonic()
            for messages in polled.values():
                for message in messages:
                    event_id = json.loads(message.value)["id"]
                    self.seen[event_id] += 1
                    self.first_seen.setdefault(event_id, now)
        consumer.close()

    def wait_for(self, ids: set[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ids <= set(self.first_seen):
                return True
            time.sleep(0.2)
        return False

    def served_since(self, start: float) -> float | None:
        """Seconds from `start` to the first prediction seen after it."""
        after = [t for t in self.first_seen.values() if t >= start]
        return round(min(after) - start, 2) if after else None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass
class Rig:
    """A broker, the topics, a `mmops serve` subprocess, a producer and a collector."""

    workdir: Path
    broker: Broker
    topics: tuple[str, str, str]
    serve: subprocess.Popen
    metrics_port: int
    producer: Producer
    collector: Collector
    serve_log: Path
    notes: dict[str, Any] = field(default_factory=dict)

    def healthz(self) -> int:
        try:
            url = f"http://{LOOPBACK}:{self.metrics_port}/healthz"
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return 0

    def log_names(self, lines: tuple[str, ...]) -> bool:
        text = self.serve_log.read_text(errors="replace")
        return any(line in text for line in lines)


@contextmanager
def rig(model: Path, workdir: Path, session_timeout_ms: int = 6000) -> Iterator[Rig]:
    broker = Broker(workdir)
    tag = uuid.uuid4().hex[:6]
    topics = (f"events-{tag}", f"predictions-{tag}", f"dlq-{tag}")
    broker.topics = topics
    broker.start()
    metrics_port = free_port()
    serve_log = workdir / f"serve-{tag}.log"
    overrides = (
        f"stream.input_topic={topics[0]}",
        f"stream.output_topic={topics[1]}",
        f"stream.dead_letter_topic={topics[2]}",
        f"stream.group_id=serve-{tag}",
        f"stream.session_timeout_ms={session_timeout_ms}",
        "stream.max_batch=16",
        "stream.liveness_timeout_s=30",
        "predict.threads=1",
        *TINY_MODEL,
    )
    args = _sets(overrides)
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}
    with serve_log.open("ab") as out:
        serve = subprocess.Popen(
            [MMOPS, "serve", "--model", str(model), "--metrics-port", str(metrics_port), *args],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    producer = collector = None
    try:
        wait_for_port(metrics_port, 120, serve)
        producer = Producer(broker.bootstrap, topics[0])
        collector = Collector(broker.bootstrap, topics[1])
        wait_for_log(serve_log, '"msg": "partitions assigned"', 60)
        yield Rig(workdir, broker, topics, serve, metrics_port, producer, collector, serve_log)
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGCONT)
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(30)
            except subprocess.TimeoutExpired:
                serve.kill()
        for part in (producer, collector):
            if part is not None:
                with contextlib.suppress(Exception):  # the broker may be gone by now
                    part.stop()
        broker.stop()


def wait_for_log(log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{log}: no {text!r} after {timeout:.0f} s")


def account(
    r: Rig, returned_at: float | None, lost_before: set[str] = frozenset(), timeout: float = 60
) -> dict[str, Any]:
    """Wait for what was produced to be served; the per-fault figures."""
    produced = r.producer.ids()
    expected = set(produced) - lost_before
    r.collector.wait_for(expected, timeout)
    time.sleep(1.0)  # duplicates arrive after the first copy
    served = set(r.collector.first_seen)
    counts = r.collector.seen
    return {
        "produced": len(produced),
        "served": len(served & set(produced)),
        "duplicates": sum(n - 1 for n in counts.values() if n > 1),
        "lost": len(expected - served),
        "broker_lost": len(lost_before - served),
        "recovery_s": None if returned_at is None else r.collector.served_since(returned_at),
        "healthz": r.healthz(),
    }


def broker_kill(model: Path, workdir: Path, outage_s: float, busy: bool) -> dict[str, Any]:
    with rig(model, workdir) as r:
        r.producer.send(40, "before")
        r.collector.wait_for(set(r.producer.ids()), 60)
        if busy:
            r.producer.pace(40, "during")
            time.sleep(1.0)
        served_at_kill = set(r.collector.first_seen)
        r.broker.kill()
        # What the memory-mode broker held and had not served is gone with it.
        lost_before = set(r.producer.ids()) - served_at_kill
        time.sleep(outage_s)
        r.broker.start()
        returned = time.monotonic()
        if busy:
            time.sleep(5)
            r.producer.halt()
        r.producer.send(100, "after")
        result = account(r, returned, lost_before)
        result["clear_error"] = r.log_names(BROKER_LINES) and result["healthz"] == 200
        return result


def consumer_sigstop(model: Path, workdir: Path, pause_s: float) -> dict[str, Any]:
    with rig(model, workdir) as r:
        r.producer.pace(40)
        time.sleep(2)
        r.serve.send_signal(signal.SIGSTOP)
        time.sleep(pause_s)
        r.serve.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        time.sleep(3)
        r.producer.halt()
        result = account(r, resumed)
        # A paused process is not a fault it can name; it needs only to serve again.
        result["clear_error"] = result["healthz"] == 200
        return result


def foreign_codecs(model: Path, workdir: Path, per_codec: int = 10) -> dict[str, Any]:
    from confluent_kafka import Producer as Librdkafka

    with rig(model, workdir) as r:
        ids: list[str] = []
        for codec in ("none", "gzip", "snappy", "lz4", "zstd"):
            client = Librdkafka(
                {"bootstrap.servers": r.broker.bootstrap, "compression.type": codec}
            )
            for i in range(per_codec):
                ids.append(f"{codec}-{i}")
                client.produce(r.topics[0], event(ids[-1]))
            client.flush(10)
        start = time.monotonic()
        r.producer.acked.update(dict.fromkeys(ids, start))  # acknowledged by librdkafka's flush
        result = account(r, start)
        result["clear_error"] = result["healthz"] == 200
        return result


# --- The registry's faults: a real MLflow server (SQLite store, artifacts it serves), the real
# CLI in subprocesses.

SMALL_DATA = (
    "validate.min_examples_per_class=5",
    "validate.min_split_size.train=50",
    "validate.min_split_size.val=5",
    "validate.min_split_size.test=5",
    "train.epochs=1",
    "train.min_steps=0",
    "train.batch_size=32",
    "train.num_workers=0",
    "train.device=cpu",
    "evaluate.latency_repeats=3",
    "export.latency_repeats=3",
    "evaluate.bootstrap_samples=50",
)
REGISTERED = "mmops-chaos"
# Short deadlines, as an operator who wants a fast clean failure would set them.
DEADLINES = ("tracking.request_timeout_s=3", "tracking.max_retries=1")


class MlflowServer:
    """`mlflow server` on a fixed port: killed and started again on the same address."""

    def __init__(self, workdir: Path, artifacts: Path | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.store = f"sqlite:///{workdir / 'mlflow.db'}"
        self.artifacts = artifacts or workdir / "artifacts"
        self.log = workdir / "mlflow.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store]
        command += ["--artifacts-destination", str(self.artifacts), "--serve-artifacts"]
        command += ["--host", LOOPBACK, "--port", str(self.port), "--workers", "1"]
        with self.log.open("ab") as out:
            # Its own process group: the server's workers are its children, and die with it.
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for_port(self.port, 90, self.process)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@dataclass
class Registry:
    workdir: Path
    server: MlflowServer
    data: Path
    env: dict[str, str]

    def command(self, *args: str) -> list[str]:
        """`mmops ARGS` with the bench's params; `--set`s in `args` come last, so they win."""
        overrides = (*SMALL_DATA, *TINY_MODEL, f"tracking.registered_model={REGISTERED}")
        return [MMOPS, args[0], *_sets(overrides), *args[1:]]

    def mmops(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(*args),
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(*args),
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def runs(self, status: str) -> list[str]:
        """Run ids of every experiment with `status`, read from the store (the server may be
        down)."""
        import sqlite3

        with sqlite3.connect(self.server.store.removeprefix("sqlite:///")) as db:
            rows = db.execute("select run_uuid from runs where status = ?", (status,))
            return [row[0] for row in rows]


@contextmanager
def registry(workdir: Path, artifacts: Path | None = None) -> Iterator[Registry]:
    server = MlflowServer(workdir, artifacts)
    server.start()
    data = workdir / "data"
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "MMOPS_LOCK_DIR": str(workdir)}
    env.pop("PREFECT_API_URL", None)
    # Deadlines a parent mmops set would count as the user's in the children: the params' rule.
    for name in [n for n in env if n.startswith("MLFLOW_HTTP_REQUEST_")]:
        env.pop(name)
    r = Registry(workdir, server, data, env)
    try:
        made = r.mmops("demo-data", str(data), "--n", "400")
        assert made.returncode == 0, made.stderr
        checked = r.mmops("validate", str(data), "--out", "reports/validate")
        assert checked.returncode == 0, checked.stderr
        yield r
    finally:
        server.kill()


def one_error_line(stderr: str, *names: str) -> bool:
    """The user saw one `error:` line, naming each of `names` (the orchestrator's own log of a
    failed task, with its traceback, may come before it: `tracebacks` counts those)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    return len(errors) == 1 and all(name in errors[0] for name in names)


def server_killed(r: Registry, command: str, restart_after_s: float | None) -> dict[str, Any]:
    """`mmops train` or `mmops retrain` with the server SIGKILLed 2 s after its first run
    started; left down (short deadlines: a quick clean failure), or started again after
    `restart_after_s` (the default deadlines wait for it)."""
    before = set(r.runs("RUNNING"))
    deadlines = DEADLINES if restart_after_s is None else ()
    args = ["--data", str(r.data), "--json", *_sets((*deadlines, "train.epochs=40"))]
    process = r.popen(command, *args)
    deadline = time.monotonic() + 180
    while not set(r.runs("RUNNING")) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    r.server.kill()
    killed = time.monotonic()
    returned = None
    if restart_after_s is not None:
        time.sleep(restart_after_s)
        r.server.start()
        returned = time.monotonic()
    _, stderr = process.communicate(timeout=1800)
    ended = time.monotonic()
    result: dict[str, Any] = {"exit_code": process.returncode}
    if restart_after_s is None:
        result["failed_after_s"] = round(ended - killed, 1)
        result["recovery_s"] = result["failed_after_s"]  # to the task's clean failure
        result["clear_error"] = process.returncode != 0 and one_error_line(stderr, r.server.url)
        orphans = set(r.runs("RUNNING")) - before
        r.server.start()
        doctor = r.mmops("doctor")
        result["orphaned_runs"] = len(orphans)
        result["closed_by_doctor"] = len(orphans - set(r.runs("RUNNING")))
        result["doctor_exit"] = doctor.returncode
    else:
        assert returned is not None
        result["recovery_s"] = round(ended - returned, 1)  # to the command's success
        result["clear_error"] = process.returncode == 0
    result["error"] = _error_line(stderr)
    result["tracebacks"] = stderr.count("Traceback (most recent call last)")
    if not result["clear_error"]:
        result["stderr_tail"] = stderr[-1500:]
    return result


def artifact_disk_full(r: Registry) -> dict[str, Any]:
    """`mmops train` logging its model to an artifact store with no room left."""
    before = set(r.runs("FAILED"))
    train = r.mmops("train", "--data", str(r.data), "--json", *_sets(DEADLINES))
    failed = set(r.runs("FAILED")) - before
    return {
        "exit_code": train.returncode,
        "clear_error": train.returncode != 0 and one_error_line(train.stderr),
        "runs_marked_failed": len(failed),
        "running_left": len(r.runs("RUNNING")),
        "recovery_s": None,
        "error": _error_line(train.stderr),
    }


def artifact_disk_full_rerun(r: Registry, small: Path) -> dict[str, Any]:
    """The same train once the store has room again: it succeeds with no hand step."""
    subprocess.run(["mount", "-o", "remount,size=256m", str(small)], check=True)
    again = r.mmops("train", "--data", str(r.data), "--json", *_sets(DEADLINES))
    return {"rerun_exit_code": again.returncode}


def exported_model(r: Registry) -> Path:
    """A trained and exported model folder, registered as v1 and champion."""
    from mmops.tracking import registry as versions

    trained = r.mmops("train", "--data", str(r.data), "--json", "--set", "train.epochs=2")
    assert trained.returncode == 0, trained.stderr[-2000:]
    model_uri = json.loads(trained.stdout.strip().splitlines()[-1])["model_uri"]
    exported = r.mmops("export", "--data", str(r.data), "--model", model_uri, "--json")
    assert exported.returncode == 0, exported.stderr[-2000:]
    result = json.loads(exported.stdout.strip().splitlines()[-1])
    os.environ["MLFLOW_TRACKING_URI"] = r.server.url
    versions.register(result["model_uri"], REGISTERED, {})
    versions.promote(REGISTERED, "1", "chaos")
    return r.workdir / "models" / "export"


def damaged_file(r: Registry, folder: Path, damage: str) -> dict[str, Any]:
    """`mmops predict` on a copy of an exported model whose served file is truncated or gone."""
    import shutil

    copy = r.workdir / f"damaged-{damage}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(folder, copy)
    served = json.loads((copy / "export.json").read_text())["serving"]
    target = copy / {"int8": "model.int8.onnx", "fp32": "model.onnx"}.get(served, "model.onnx")
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target.unlink()
    out = r.workdir / f"predictions-{damage}.jsonl"
    started = time.monotonic()
    ran = r.mmops("predict", "--model", str(copy), "--data", str(r.data), "--out", str(out))
    return {
        "exit_code": ran.returncode,
        "served": served,
        "failed_after_s": round(time.monotonic() - started, 1),
        # No silent backend switch: refused, naming the file, nothing predicted.
        "clear_error": ran.returncode == 1 and one_error_line(ran.stderr, target.name),
        "predictions_written": out.exists() and out.stat().st_size > 0,
        "recovery_s": None,
        "error": _error_line(ran.stderr),
    }


HOLDER = """
import sys, time
from mmops.environment import mlflow_client
from mmops.tracking.lease import promotion_lease
with promotion_lease(mlflow_client(), sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def lease_holder_killed(r: Registry) -> dict[str, Any]:
    """A process holding the promotion lease SIGKILLed; then `mmops promote`."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, REGISTERED],
        env=r.env,
        cwd=r.workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    killed = time.monotonic()
    promoted = r.mmops("promote", "1", "--reason", "after a killed holder", timeout=3700)
    took = round(time.monotonic() - killed, 1)
    return {
        "exit_code": promoted.returncode,
        "recovery_s": took,  # from the kill to the next promote done
        "clear_error": promoted.returncode == 0
        and "taking over the promotion lease" in (promoted.stderr),
    }


def _sets(overrides: tuple[str, ...]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def _error_line(stderr: str) -> str | None:
    return next((line for line in stderr.splitlines() if line.startswith("error:")), None)


def full_folder(workdir: Path, size_kb: int = 256) -> Path | None:
    """A tmpfs of `size_kb` mounted under `workdir` (None where mounting is not allowed)."""
    folder = workdir / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    return folder if mounted.returncode == 0 else None


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


def tracking_faults(names: list[str], workdir: Path) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    killed = {
        "mlflow_down": ("train", None),
        "mlflow_down_retrain": ("retrain", None),
        "mlflow_restarted": ("retrain", 15.0),
    }
    if set(killed) & set(names):
        with registry(workdir / "tracking") as r:
            for name, (command, restart_after_s) in killed.items():
                if name in names:
                    started = time.monotonic()
                    result = server_killed(r, command, restart_after_s)
                    results[name] = {**result, "wall_s": round(time.monotonic() - started, 1)}
    if "artifact_disk_full" in names:
        (workdir / "disk").mkdir(parents=True)
        small = full_folder(workdir / "disk")
        if small is None:
            results["artifact_disk_full"] = {"skipped": "cannot mount a tmpfs here"}
        else:
            try:
                with registry(workdir / "disk", artifacts=small) as r:
                    results["artifact_disk_full"] = {
                        **artifact_disk_full(r),
                        **artifact_disk_full_rerun(r, small),
                    }
            finally:
                unmount(small)
    model_faults = ("int8_truncated", "int8_deleted", "lease_holder_killed")
    if set(model_faults) & set(names):
        with registry(workdir / "models") as r:
            folder = exported_model(r)
            for damage in ("truncated", "deleted"):
                if f"int8_{damage}" in names:
                    results[f"int8_{damage}"] = damaged_file(r, folder, damage)
            if "lease_holder_killed" in names:
                results["lease_holder_killed"] = lease_holder_killed(r)
    return results


TRACKING_FAULTS = [
    "mlflow_down",
    "mlflow_down_retrain",
    "mlflow_restarted",
    "artifact_disk_full",
    "int8_truncated",
    "int8_deleted",
    "lease_holder_killed",
]


def run_faults(
    names: list[str], outage_s: float, workdir: Path, model: Path | None = None
) -> dict[str, dict[str, Any]]:
    if model is None and set(names) & set(STREAM_FAULTS):
        model = tiny_model(workdir / "model")
    faults: dict[str, Callable[[], dict[str, Any]]] = {
        "broker_kill_busy": lambda: broker_kill(model, workdir, outage_s, busy=True),
        "broker_kill_idle": lambda: broker_kill(model, workdir, outage_s, busy=False),
        # Past the group's 6 s session timeout and the sends' delivery timeout (25 s at the
        # defaults): the group forgets the member, the producer gives up its batches.
        "broker_outage_long": lambda: broker_kill(model, workdir, max(3 * outage_s, 12), busy=True),
        "consumer_sigstop": lambda: consumer_sigstop(model, workdir, 10),
        "foreign_codecs": lambda: foreign_codecs(model, workdir),
    }
    results = {}
    for name in names:
        started = time.monotonic()
        if name in faults:
            results[name] = {**faults[name](), "wall_s": round(time.monotonic() - started, 1)}
    tracking = [name for name in names if name in TRACKING_FAULTS]
    if tracking:
        results.update(tracking_faults(tracking, workdir))
    return results


STREAM_FAULTS = [
    "broker_kill_busy",
    "broker_kill_idle",
    "broker_outage_long",
    "consumer_sigstop",
    "foreign_codecs",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage-s", type=float, default=20.0, help="broker down this long")
    parser.add_argument("--faults", default=",".join(STREAM_FAULTS + TRACKING_FAULTS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mmops-chaos-") as tmp:
        results = run_faults(args.faults.split(","), args.outage_s, Path(tmp))
    ok = all(
        r.get("lost", 0) == 0 and (r.get("recovery_s") or 0) < 30 and r.get("clear_error")
        for r in results.values()
        if "skipped" not in r
    )
    print(json.dumps({"bench": "chaos", "outage_s": args.outage_s, "ok": ok, "faults": results}))


if __name__ == "__main__":
    main()
