"""Drift monitoring in `mmops serve` against a real broker (Tansu) and a real MLflow registry,
and the retrain trigger against a real Prefect API."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import mlflow
import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition
from prometheus_client import generate_latest

from mmops.config import Params, TriggerConfig, load_params
from mmops.data.dataset import read_manifest
from mmops.data.demo import make_demo_data
from mmops.local.stack import LOOPBACK, create_topics, free_port
from mmops.monitoring.monitor import DriftEvent
from mmops.monitoring.shifts import shifted_stream
from mmops.serving.embeddings import REFERENCES_FILE, load_references
from mmops.serving.predictor import Predictor
from mmops.stream.replay import dataset_events
from mmops.stream.server import StreamServer
from mmops.tracking import registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "mmops-drift-test"
PARTITIONS = 2
# Small enough for the 80 held-out rows of the 400-row demo data the tiny model exports with.
# The whole stream watched (no compute budget): this tests detection, not sampling.
DRIFT = (
    "drift.window=40",
    "drift.ert=20000",
    "drift.streams=150",
    "drift.horizon=400",
    "drift.max_busy_share=1.0",
)
EVENTS = 320


@pytest.fixture(scope="module")
def registered(
    train_and_export: Callable[..., tuple[str, dict[str, str]]],
    tmp_path_factory: pytest.TempPathFactory,
    mlflow_store: Callable[..., AbstractContextManager[str]],
) -> Iterator[dict[str, Any]]:
    """A tiny model trained, exported (with its references) and registered as the champion;
    live events from demo data of another seed than the training data."""
    workdir = tmp_path_factory.mktemp("drift")
    with mlflow_store(workdir):
        _, exported = train_and_export("train.epochs=4", "train.lr=0.003")
        registry.register(exported["model_uri"], MODEL, {})
        registry.promote(MODEL, "1", "first champion")
        live = workdir / "live"
        make_demo_data(live, n=300, seed=11)
        events = dataset_events(read_manifest(live).to_dict("records"), live)
        yield {"workdir": workdir, "events": events, "export": workdir / "models" / "export"}


def test_reference_embeddings_are_stored_with_the_version_and_a_fresh_consumer_loads_them(
    registered: dict[str, Any],
) -> None:
    client = mlflow.MlflowClient()
    version = client.get_model_version(MODEL, "1")
    assert version.tags["mmops.digests"]  # the digests cover references.npz too
    assert REFERENCES_FILE in json.loads(version.tags["mmops.digests"])
    predictor = Predictor.load(f"models:/{MODEL}@champion")
    loaded = predictor.references
    assert loaded is not None
    assert set(loaded.signals()) == {"image", "text", "fused", "prediction"}
    assert loaded.splits == ["val", "test"] and loaded.backend == predictor.backend
    exported = load_references(registered["export"])
    assert exported is not None
    for name, values in exported.signals().items():
        np.testing.assert_array_equal(loaded.signals()[name], values)


def topic_params(tag: str) -> tuple[Params, dict[str, str]]:
    names = {
        "input": f"events-{tag}",
        "output": f"predictions-{tag}",
        "dead": f"dlq-{tag}",
        "drift": f"drift-{tag}",
    }
    overrides = (
        f"stream.input_topic={names['input']}",
        f"stream.output_topic={names['output']}",
        f"stream.dead_letter_topic={names['dead']}",
        f"drift.topic={names['drift']}",
        f"stream.group_id=serve-{tag}",
        f"tracking.registered_model={MODEL}",
        "stream.max_batch=16",
        "stream.metrics_port=0",
        *DRIFT,
    )
    return load_params(None, overrides), names


def send(bootstrap: str, topic: str, events: list[dict[str, Any]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for event in events:
        producer.send(topic, json.dumps(event).encode())
    producer.flush()
    producer.close()


def wait_served(server: StreamServer, events: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while server.stats.events < events:
        assert time.monotonic() < deadline, f"served {server.stats.events} of {events}"
        time.sleep(0.2)
    assert server.drift is not None and server.drift.drain()


def drift_events(bootstrap: str, topic: str, timeout: float = 30) -> list[dict[str, Any]]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not found and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            found += [json.loads(m.value) for m in batch]
    consumer.close()
    return found


def test_a_shifted_replay_alarms_for_the_modality_that_moved_and_an_unshifted_one_does_not(
    registered: dict[str, Any], bootstrap: str
) -> None:
    params, topics = topic_params(uuid.uuid4().hex[:8])
    create_topics(bootstrap, list(topics.values()), PARTITIONS)
    server = StreamServer(params, kafka={"bootstrap_servers": bootstrap})
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        source = registered["events"]
        steady = shifted_stream(source, "none", EVENTS, EVENTS, seed=3)
        for event in steady:
            event["label"] = event["truth"]  # events that arrive labelled
        send(bootstrap, topics["input"], steady)
        wait_served(server, EVENTS)
        assert server.drift is not None and server.drift.ready.is_set()
        assert server.drift.alarms == []
        metrics = server.metrics.registry
        accuracy = metrics.get_sample_value("mmops_online_accuracy", {"version": "1"})
        assert accuracy is not None and 0.0 <= accuracy <= 1.0
        assert 'mmops_online_accuracy{version="1"}' in generate_latest(metrics).decode()

        moved = shifted_stream(source, "text", 0, EVENTS, seed=4)
        send(bootstrap, topics["input"], moved)
        wait_served(server, 2 * EVENTS)
        named = {alarm.modality for alarm in server.drift.alarms}
        assert "text" in named and "image" not in named, named
        assert metrics.get_sample_value("mmops_drift_alarm", {"modality": "text"}) == 1
        assert metrics.get_sample_value("mmops_drift_alarm", {"modality": "image"}) == 0
    finally:
        server.stop()
        thread.join(timeout=30)
    [event] = [e for e in drift_events(bootstrap, topics["drift"]) if e["modality"] == "text"]
    assert {"model", "version", "modality", "statistic", "threshold", "window", "ts"} <= set(event)
    assert event["model"] == MODEL and event["version"] == "1"
    assert event["statistic"] > event["threshold"]
    first, last = event["window"]["first"], event["window"]["last"]
    assert first["topic"] == last["topic"] == topics["input"]


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_alarms_start_exactly_one_retrain_run_within_the_cool_down(prefect_api: None) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    from mmops_flows.retrain import retrain_and_evaluate
    from mmops_flows.trigger import DriftTrigger

    retrain_and_evaluate.to_deployment(name="drift-test").apply()  # no worker: runs wait
    cfg = TriggerConfig(enabled=True, deployment="retrain_and_evaluate/drift-test")
    alarm = DriftEvent(MODEL, "1", "text", "mmd", 0.5, 0.1, {"first": {}, "last": {}}, 400)
    triggers = [DriftTrigger(cfg), DriftTrigger(cfg)]  # two consumers of one group
    for trigger in triggers:
        trigger(alarm)
        for thread in trigger.threads:
            thread.join(timeout=60)
    triggers[0](alarm)  # again, within the cool-down
    for thread in triggers[0].threads:
        thread.join(timeout=60)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(cfg.deployment)
        every = client.read_flow_runs(limit=100, sort=FlowRunSort.ID_DESC)
        runs = [r for r in every if r.deployment_id == deployment.id]
    assert len(runs) == 1, [r.name for r in runs]
    [run] = runs
    assert run.parameters["trigger"] == "drift" and "drift" in run.tags
    assert json.loads(run.parameters["reason"])["modality"] == "text"
    assert sum(len(t.started) for t in triggers) == 1


def test_with_the_api_away_an_alarm_starts_nothing_and_returns_at_once() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from mmops_flows.trigger import DriftTrigger

    trigger = DriftTrigger(TriggerConfig(enabled=True))
    alarm = DriftEvent(MODEL, "1", "image", "mmd", 0.5, 0.1, {"first": {}, "last": {}}, 400)
    with temporary_settings({PREFECT_API_URL: f"http://{LOOPBACK}:{free_port()}/api"}):
        started = time.monotonic()
        trigger(alarm)  # the monitor's thread goes on: the call is on its own thread
        assert time.monotonic() - started < 1
        for thread in trigger.threads:
            thread.join(timeout=120)
    assert trigger.started == []
