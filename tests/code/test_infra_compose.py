"""infra/docker-compose*.yml and the Dockerfiles, checked statically (no docker engine runs here).

The compose files are interpolated the way `docker compose` does it, with the values of
infra/.env.example, then validated against the compose specification's JSON schema (vendored by
check-jsonschema) and against the code: commands, options, environment names, ports, partitions.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import shlex
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from mmops_command import mmops_command_error

from mmops.config import load_params
from mmops.environment import LIBRARY_VARIABLES, VARIABLES

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE_FILES = [INFRA / "docker-compose.yml", INFRA / "docker-compose.gpu.yml"]
VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
MMOPS_IMAGE = "ghcr.io/mmops/mmops"
SECRET_WORDS = ("PASSWORD", "SECRET", "AUTH_STRING")
# Written by infra/tls/make-certs.sh, never committed: bind mounts from here need not exist yet.
GENERATED = "./tls/certs/"


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            pairs[name.strip()] = value.strip()
    return pairs


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`; `$$` is `$`."""

    def value(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if op in (":-", ":?") and env.get(name):
            return env[name]
        if op == "-":
            return env.get(name, arg)
        if op == ":-":
            return arg
        if op == ":?":
            raise KeyError(f"{name} is required: {arg}")
        if name not in env:
            raise KeyError(f"{name} has no value and no default")
        return env[name]

    return VARIABLE.sub(value, text.replace("$$", "\0")).replace("\0", "$")


def filled_env() -> dict[str, str]:
    """.env.example with its blank secrets filled in, as a user's infra/.env would have them."""
    return {k: v or f"example-{k.lower()}" for k, v in env_example().items()}


@cache
def compose(path: Path = COMPOSE_FILES[0]) -> dict[str, Any]:
    return yaml.safe_load(interpolate(path.read_text(), filled_env()))


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def mmops_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services().items() if s.get("image", "").startswith(MMOPS_IMAGE)}


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


@cache
def help_text(*args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", *args, "--help"], capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_match_the_compose_specification(path: Path) -> None:
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(schema_file.joinpath("compose-spec.json").read_text())
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(compose(path)))
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_every_variable_is_in_the_env_template_or_has_a_default() -> None:
    used = set()
    for path in COMPOSE_FILES:
        text = path.read_text()
        used |= {m["name"] for m in VARIABLE.finditer(text)}
        interpolate(text, filled_env())  # raises on a variable without value or default
    # Every secret is blank in the template and required: compose stops without it, naming it.
    blank = [k for k, v in env_example().items() if not v]
    assert "POSTGRES_PASSWORD" in blank
    for name in blank:
        with pytest.raises(KeyError, match=name):
            interpolate(COMPOSE_FILES[0].read_text(), {**filled_env(), name: ""})
    assert set(env_example()) <= used, f"unused in compose: {set(env_example()) - used}"


def test_the_stack_runs_every_component() -> None:
    assert set(services()) == {
        "kafka",
        "topics",
        "postgres",
        "minio",
        "buckets",
        "mlflow",
        "prefect-server",
        "prefect-worker",
        "flow-deploy",
        "consumer",
        "serve-http",
        "prometheus",
        "grafana",
    }
    kafka = services()["kafka"]["environment"]
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft: no ZooKeeper


def test_services_have_healthchecks_and_one_shots_run_once() -> None:
    for name, service in services().items():
        one_shot = service.get("restart") == "no"
        assert one_shot or "healthcheck" in service, f"{name}: no healthcheck"
        assert not (one_shot and "healthcheck" in service), name
        for dependency, spec in service.get("depends_on", {}).items():
            target = services()[dependency]
            if target.get("restart") == "no":
                assert spec["condition"] == "service_completed_successfully", (name, dependency)
            elif spec["condition"] == "service_healthy":
                assert "healthcheck" in target, (name, dependency)


def mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """A service's volumes in the long syntax (source, target, read_only)."""
    long = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            long.append(volume)
        else:
            source, target, *mode = volume.split(":")
            long.append({"source": source, "target": target, "read_only": mode == ["ro"]})
    return long


def test_named_volumes_are_declared_and_used() -> None:
    declared = set(compose()["volumes"])
    mounted = set()
    for name, service in services().items():
        for volume in mounts(service):
            source = volume["source"]
            if source.startswith(GENERATED):
                # Generated files: a missing folder must stop `up`, not become an empty mount.
                assert volume["read_only"] and volume["bind"]["create_host_path"] is False, name
            elif source.startswith((".", "/")):
                assert (INFRA / source).exists(), f"{name}: {source} is missing"
            else:
                mounted.add(source)
    assert mounted == declared


def test_mmops_commands_and_options_exist() -> None:
    seen = set()
    for name, service in mmops_services().items():
        cmd = command(service)
        if cmd[0] != "mmops":
            continue
        error = mmops_command_error(cmd[1:])
        assert error is None, f"{name}: {error}"
        seen.add(cmd[1])
    assert {"serve", "topics"} <= seen


def test_mlflow_and_prefect_commands_use_real_options() -> None:
    for name in ("mlflow", "prefect-server", "prefect-worker", "flow-deploy"):
        program, *args = command(services()[name])
        if args[0] == "--no-prompt":  # a global prefect option, before the subcommand
            args = args[1:]
        # The subcommand: the words before the first option.
        path = args[: next(i for i, w in enumerate(args) if w.startswith("-"))]
        text = help_text(program, *path)
        for word in args:
            if word.startswith("--"):
                assert word in text, f"{name}: {program} {' '.join(path)} has no {word}"


def test_environment_names_are_read_by_mmops_or_its_libraries() -> None:
    known = set(VARIABLES) | set(LIBRARY_VARIABLES)
    for name, service in mmops_services().items():
        unknown = set(service.get("environment", {})) - known
        assert not unknown, f"{name}: {unknown} (add them to mmops/environment.py)"
    assert mmops_services()["consumer"]["environment"].keys() >= {
        "KAFKA_BOOTSTRAP_SERVERS",
        "MLFLOW_TRACKING_URI",
    }


def test_secrets_come_from_the_env_file_never_the_compose_file() -> None:
    raw = yaml.safe_load(COMPOSE_FILES[0].read_text())
    for name, service in raw["services"].items():
        environment = service.get("environment", {})
        for key, value in environment.items():
            if any(word in key for word in SECRET_WORDS):
                assert str(value).startswith("${"), f"{name}: {key} is a literal"
    # Passwords inside URLs are interpolated too, or left to libpq's PGPASSWORD.
    text = COMPOSE_FILES[0].read_text()
    assert "postgresql+asyncpg://mmops:${POSTGRES_PASSWORD}@" in text
    for url in re.findall(r"postgresql[+\w]*://[^\s'\"]+", text):
        user_info = url.split("://", 1)[1].split("@")[0]
        assert ":" not in user_info or user_info.endswith(":${POSTGRES_PASSWORD}"), url
    assert all(not v for k, v in env_example().items() if any(w in k for w in SECRET_WORDS))


def test_prometheus_scrapes_every_consumer_replica_on_its_metrics_port() -> None:
    scrape = yaml.safe_load((INFRA / "prometheus/prometheus.yml").read_text())
    [job] = [j for j in scrape["scrape_configs"] if j["job_name"] == "mmops-consumer"]
    [discovery] = job["dns_sd_configs"]
    port = load_params(ROOT / "params.yaml").stream.metrics_port
    assert discovery["names"] == ["consumer"] and discovery["type"] == "A"
    assert discovery["port"] == port
    assert option(command(services()["consumer"]), "--metrics-port") == str(port)


def test_consumers_fit_the_partitions_and_the_broker_fits_the_events() -> None:
    partitions = int(option(command(services()["topics"]), "--partitions"))
    replicas = int(services()["consumer"]["deploy"]["replicas"])
    assert 1 <= replicas <= partitions
    max_bytes = int(services()["kafka"]["environment"]["KAFKA_MESSAGE_MAX_BYTES"])
    assert max_bytes >= load_params(ROOT / "params.yaml").stream.max_event_bytes


def test_the_worker_serves_the_deployments_pool_and_the_buckets_match_the_stores() -> None:
    prefect = yaml.safe_load((INFRA / "prefect/prefect.yaml").read_text())
    [deployment] = prefect["deployments"]
    worker = command(services()["prefect-worker"])
    assert option(worker, "--pool") == deployment["work_pool"]["name"]
    deploy = command(services()["flow-deploy"])
    assert (ROOT / option(deploy, "--prefect-file")).is_file()
    assert "--remote prod" in json.dumps(prefect["pull"])

    buckets = " ".join(command(services()["buckets"]))
    dvc_config = (ROOT / ".dvc/config").read_text()
    dvc_bucket = re.search(r"url = s3://([^/\s]+)", dvc_config)
    assert dvc_bucket and f"s3/{dvc_bucket[1]}" in buckets
    artifacts = option(command(services()["mlflow"]), "--artifacts-destination")
    assert f"s3/{artifacts.removeprefix('s3://').split('/')[0]}" in buckets


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu", "Dockerfile.serve"])
def test_dockerfiles_copy_what_exists_and_install_real_extras(name: str) -> None:
    text = (INFRA / "docker" / name).read_text()
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        sources = [w for w in line.split() if not w.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"{name}: COPY {source} does not exist"
            assert source not in ignored, f"{name}: COPY {source} is docker-ignored"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for extra in re.findall(r'"\.\[(\w+)\]"', text):
        assert extra in extras, f"{name}: no extra {extra!r} in pyproject.toml"
    assert "-c infra/constraints.txt" in text
    assert "USER mmops" in text  # not root
    builds = [
        s["build"]["dockerfile"]
        for p in COMPOSE_FILES
        for s in compose(p)["services"].values()
        if "build" in s
    ]
    assert f"infra/docker/{name}" in builds
