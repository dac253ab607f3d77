"""`mmops topics` against a real broker (Tansu): waits for it, creates the topics once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from mmops.local.stack import LOOPBACK, free_port, start_broker

pytestmark = pytest.mark.integration

MMOPS = str(Path(sys.executable).parent / "mmops")
# The params defaults: events, predictions, dead letters, drift events and late labels.
TOPICS = ("mmops.events", "mmops.predictions", "mmops.events.dlq", "mmops.drift", "mmops.feedback")


def test_topics_waits_for_the_broker_and_is_idempotent(tmp_path: Path) -> None:
    port = free_port()
    bootstrap = f"{LOOPBACK}:{port}"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap}

    def topics(*args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [MMOPS, "topics", *args],
            cwd=tmp_path,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    first = topics("--partitions", "3", "--wait", "60")
    time.sleep(3)  # the init starts before its broker, as in docker-compose
    broker = start_broker(port, tmp_path / "broker.log")
    try:
        out, err = first.communicate(timeout=90)
        assert first.returncode == 0, err
        assert [line.split() for line in out.splitlines()] == [
            [name, "created", "3", "partitions"] for name in TOPICS
        ]

        second = topics("--partitions", "5", "--wait", "5")
        out, err = second.communicate(timeout=60)
        assert second.returncode == 0, err
        assert [line.split() for line in out.splitlines()] == [
            [name, "exists", "3", "partitions"] for name in TOPICS
        ]

        consumer = KafkaConsumer(bootstrap_servers=bootstrap)
        try:
            assert {name: len(consumer.partitions_for_topic(name) or ()) for name in TOPICS} == {
                name: 3 for name in TOPICS
            }
        finally:
            consumer.close()
    finally:
        broker.kill()
        broker.wait()
