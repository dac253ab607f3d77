"""The stream through its services' faults: a real broker (Tansu) SIGKILLed and restarted, a
real `mmops serve` paused, events from librdkafka; every event counted by id.

The faults are `bench/chaos.py`'s, run here with short outages: one harness, so the figures the
bench prints are what these tests check.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHAOS = Path(__file__).parents[2] / "bench" / "chaos.py"


def load_chaos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mmops_bench_chaos", CHAOS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


chaos = load_chaos()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chaos.tiny_model(tmp_path_factory.mktemp("chaos") / "model")


def run(fault: str, model: Path, tmp_path: Path, outage_s: float = 4) -> dict[str, Any]:
    result = chaos.run_faults([fault], outage_s, tmp_path, model)[fault]
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in tmp_path.glob("serve-*.log"))
    assert result["lost"] == 0, (result, logs)
    assert (
        result["produced"] > 0 and result["served"] == result["produced"] - result["broker_lost"]
    ), (result, logs)
    assert result["recovery_s"] is not None and result["recovery_s"] < 30, (result, logs)
    assert result["healthz"] == 200 and result["clear_error"], (result, logs)
    return result


def test_a_broker_killed_while_events_flow_and_restarted_serves_all_it_takes_after(
    model: Path, tmp_path: Path
) -> None:
    # Before: the idempotent producer turned fatal on the restarted broker and was reused
    # forever (0 of 453 served); now it is replaced at the first failed send.
    result = run("broker_kill_busy", model, tmp_path)
    assert result["recovery_s"] < 15


def test_a_broker_killed_while_the_consumer_is_idle_serves_what_comes_after(
    model: Path, tmp_path: Path
) -> None:
    run("broker_kill_idle", model, tmp_path)


def test_a_broker_outage_longer_than_the_session_timeout_is_survived(
    model: Path, tmp_path: Path
) -> None:
    run("broker_outage_long", model, tmp_path)


def test_a_consumer_paused_past_its_session_timeout_serves_everything_once_it_continues(
    model: Path, tmp_path: Path
) -> None:
    run("consumer_sigstop", model, tmp_path)


def test_events_from_librdkafka_in_every_codec_are_all_served(model: Path, tmp_path: Path) -> None:
    run("foreign_codecs", model, tmp_path)
