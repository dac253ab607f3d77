"""Fixtures of the real-component tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mmops.local.stack import LOOPBACK, free_port, start_broker


@pytest.fixture(scope="module")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Kafka-compatible broker (Tansu, memory storage) of the module's own; its address."""
    port = free_port()
    process = start_broker(port, tmp_path_factory.mktemp("broker") / "broker.log")
    yield f"{LOOPBACK}:{port}"
    process.kill()
    process.wait()
