"""The alert rules in a real Prometheus server (Debian's `prometheus`), scraping a real
consumer's metrics endpoint: the rules load healthy, the drift gauges of any modality arrive, and
a drift alarm turns its alert pending for that modality only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmops.local.stack import LOOPBACK, free_port
from mmops.stream.metrics import StreamMetrics

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "infra" / "prometheus" / "alerts.yml"


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail("prometheus is not installed: infra/local/setup.sh installs it as root")
        pytest.skip("prometheus is not installed (infra/local/setup.sh installs it as root)")
    return found


def api(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/api/v1/{path}", timeout=5) as answer:
        body = json.loads(answer.read())
    assert body["status"] == "success", body
    return body["data"]


def wait_for(check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
            if found:
                return found
        except (OSError, ValueError):
            pass  # the server still starting
        assert time.monotonic() < deadline, "Prometheus did not get there in time"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def consumer_metrics() -> Iterator[tuple[StreamMetrics, int]]:
    """A consumer's metrics endpoint, as `mmops serve` exposes it."""
    metrics = StreamMetrics()
    port = free_port()
    metrics.serve(port)
    yield metrics, port
    metrics.close()


@pytest.fixture(scope="module")
def prometheus(
    consumer_metrics: tuple[StreamMetrics, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    """Prometheus with the repository's alert rules, scraping the consumer every second."""
    binary = prometheus_binary()
    folder = tmp_path_factory.mktemp("prometheus")
    shutil.copy(ALERTS, folder / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {
                "job_name": "mmops-consumer",
                "static_configs": [{"targets": [f"{LOOPBACK}:{consumer_metrics[1]}"]}],
            }
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (folder / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address={LOOPBACK}:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: api(port, "status/buildinfo"))
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_the_rules_load_healthy_and_a_drift_alarm_is_pending_for_its_modality_only(
    consumer_metrics: tuple[StreamMetrics, int], prometheus: int
) -> None:
    metrics, _ = consumer_metrics
    for modality in ("image", "audio"):  # any name: the rules never list modalities
        metrics.drift_threshold.labels(modality).set(0.05)
        metrics.drift_statistic.labels(modality).set(0.01)
        metrics.drift_alarm.labels(modality).set(0)
    metrics.online_accuracy.labels("7").set(0.9)

    def evaluated() -> list[dict[str, Any]]:
        groups = api(prometheus, "rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else []

    rules = wait_for(evaluated)
    expected = [
        r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]
    ]
    assert sorted(r["name"] for r in rules) == sorted(expected)
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]

    def up() -> bool:
        [target] = api(prometheus, "targets")["activeTargets"]
        return target["health"] == "up"

    wait_for(up)
    wait_for(lambda: api(prometheus, "query?query=mmops_drift_alarm")["result"])
    accuracy = api(prometheus, "query?query=mmops_online_accuracy")["result"]
    assert [(r["metric"]["version"], r["value"][1]) for r in accuracy] == [("7", "0.9")]

    metrics.drift_statistic.labels("audio").set(0.2)
    metrics.drift_alarm.labels("audio").set(1)

    def drift_alerts() -> list[dict[str, Any]]:
        alerts = api(prometheus, "alerts")["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "MmopsDriftAlarm"]

    [alert] = wait_for(drift_alerts)
    assert alert["labels"]["modality"] == "audio" and alert["state"] == "pending"  # `for: 5m`
    assert "audio" in alert["annotations"]["summary"]
