"""The production Prefect deployment declared in infra/ matches the flow and params.yaml."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from mmops.config import load_params

ROOT = Path(__file__).resolve().parents[2]


def test_prefect_yaml_declares_the_monthly_retrain() -> None:
    spec = yaml.safe_load((ROOT / "infra/prefect/prefect.yaml").read_text())
    [deployment] = spec["deployments"]
    params = load_params(ROOT / "params.yaml")

    path, name = deployment["entrypoint"].split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    assert getattr(module, name).name == "retrain_and_evaluate"
    [schedule] = deployment["schedules"]
    assert schedule["cron"] == params.schedule.cron == "0 3 1 * *"
    assert schedule["timezone"] == params.schedule.timezone
    assert deployment["name"] == params.schedule.name
