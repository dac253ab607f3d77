"""The lean serving image (infra/docker/Dockerfile.serve) and the compose stack's `serve-http`
service: `mmops serve-http` on the compose MLflow's champion, checked, and scraped."""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any

import yaml
from mmops_command import mmops_command_error
from test_infra_compose import INFRA, ROOT, command, option, services

from mmops.config import load_params

SERVICE = "serve-http"
DOCKERFILE = INFRA / "docker/Dockerfile.serve"
SERVE_IMAGE = "ghcr.io/mmops/mmops-serve"
# What the serving image must never pull in: the training stack.
TRAINING_ONLY = {"torch", "transformers", "prefect", "dvc", "great-expectations", "mlflow"}


def dockerfile() -> str:
    return DOCKERFILE.read_text()


def instruction(name: str) -> str:
    """The last `NAME ...` instruction's arguments, continuation lines joined."""
    text = dockerfile().replace("\\\n", " ")
    found = re.findall(rf"^{name} (.+)$", text, re.M)
    assert found, f"Dockerfile.serve has no {name}"
    return found[-1]


def entrypoint() -> list[str]:
    words = json.loads(instruction("ENTRYPOINT"))
    return words[2:] if words[:2] == ["tini", "--"] else words


def service() -> dict[str, Any]:
    return services()[SERVICE]


def invocation() -> list[str]:
    """`mmops serve-http ...` as the container runs it: the image's entrypoint, then `command`."""
    words = [*entrypoint(), *command(service())]
    assert words[0] == "mmops", words
    return words[1:]


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[\s]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_image_installs_the_base_and_serve_only_without_torch() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = re.findall(r'x\["(\w+)"\]', dockerfile())
    assert extras == ["serve"]
    assert re.findall(r'"\.\[([\w,]+)\]"', dockerfile()) == ["serve"]
    installed = [*project["dependencies"], *project["optional-dependencies"]["serve"]]
    assert not requirement_names(installed) & TRAINING_ONLY
    assert "download.pytorch.org" not in dockerfile()


def test_the_image_runs_serve_http_as_a_user_with_its_ports_and_liveness() -> None:
    text = dockerfile()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert "USER mmops" in text and "useradd --uid 10001" in text
    assert entrypoint() == ["mmops", "serve-http"]
    assert set(instruction("EXPOSE").split()) == {"8080", "8081"}
    assert "localhost:8080/v2/health/live'" in instruction("HEALTHCHECK")


def test_the_service_builds_and_runs_the_serve_image() -> None:
    assert service()["build"]["dockerfile"] == "infra/docker/Dockerfile.serve"
    assert service()["image"].startswith(f"{SERVE_IMAGE}:")
    assert service()["restart"] == "unless-stopped"


def test_serve_http_command_parses_against_the_cli() -> None:
    """Waits for `mmops serve-http`: fails until the command exists."""
    args = invocation()
    assert args[0] == "serve-http"
    error = mmops_command_error(args)
    assert error is None, error


def test_the_service_follows_the_champion_of_the_compose_mlflow() -> None:
    registered = load_params(ROOT / "params.yaml").tracking.registered_model
    assert option(invocation(), "--model") == f"models:/{registered}@champion"
    env = service()["environment"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert service()["depends_on"]["mlflow"]["condition"] == "service_healthy"
    # The MLflow server proxies artifacts: the server holds no S3 or Kafka credentials.
    assert not [k for k in env if k.startswith(("AWS_", "KAFKA_"))]


def test_the_service_publishes_its_ports_and_checks_readiness() -> None:
    args = invocation()
    http, grpc = option(args, "--port"), option(args, "--grpc-port")
    assert option(args, "--host") == "0.0.0.0"
    published = {str(p).rsplit(":", 1)[-1] for p in service()["ports"]}
    assert published == {http, grpc}
    for port in service()["ports"]:
        assert str(port).startswith("127.0.0.1:"), "bound to MMOPS_BIND, loopback by default"
    check = " ".join(service()["healthcheck"]["test"])
    assert f"localhost:{http}/v2/health/ready'" in check


def test_prometheus_scrapes_every_server_replica_on_its_http_port() -> None:
    scrape = yaml.safe_load((INFRA / "prometheus/prometheus.yml").read_text())
    [job] = [j for j in scrape["scrape_configs"] if j["job_name"] == "mmops-serve-http"]
    [discovery] = job["dns_sd_configs"]
    assert discovery["names"] == [SERVICE] and discovery["type"] == "A"
    assert str(discovery["port"]) == option(invocation(), "--port")
    assert job.get("metrics_path", "/metrics") == "/metrics"
