"""The compose stack guards itself: Kafka only over mutual TLS, MLflow and Prefect behind logins,
no credential with a default. Checked statically, and the certificates by a TLS handshake."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest
from test_infra_compose import (
    COMPOSE_FILES,
    GENERATED,
    INFRA,
    VARIABLE,
    command,
    env_example,
    mmops_services,
    mounts,
    option,
    services,
)

MAKE_CERTS = INFRA / "tls/make-certs.sh"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH_STRING|TOKEN|API_KEY")
LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def listeners(value: str) -> dict[str, tuple[str, int]]:
    """`NAME://host:port,...` as {NAME: (host, port)}."""
    found = {}
    for item in value.split(","):
        name, address = item.split("://")
        host, port = address.rsplit(":", 1)
        found[name] = (host, int(port))
    return found


def kafka_env() -> dict[str, Any]:
    return services()["kafka"]["environment"]


def mounted_at(service: dict[str, Any], path: str) -> dict[str, Any]:
    """The mount a container path lies in."""
    [mount] = [m for m in mounts(service) if Path(path).is_relative_to(m["target"])]
    return mount


def host_path(service: dict[str, Any], path: str, out: Path) -> Path:
    """Where a container path of a generated mount lies in make-certs.sh's output folder."""
    mount = mounted_at(service, path)
    assert mount["source"].startswith(GENERATED), mount
    return out / mount["source"].removeprefix(GENERATED) / Path(path).relative_to(mount["target"])


def raw_environment(name: str) -> dict[str, str]:
    """A service's environment before interpolation, merges resolved."""
    import yaml

    return yaml.safe_load(COMPOSE_FILES[0].read_text())["services"][name]["environment"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """infra/tls/make-certs.sh's output, made in a temporary folder."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    out = tmp_path_factory.mktemp("tls") / "certs"
    uid = str(os.getuid())
    env = {**os.environ, "TLS_OUT": str(out), "KAFKA_UID": uid, "MMOPS_UID": uid}
    subprocess.run(["bash", str(MAKE_CERTS)], env=env, check=True, capture_output=True, timeout=60)
    return out


def test_kafka_takes_clients_only_over_mutual_tls() -> None:
    env = kafka_env()
    protocols = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    bound = listeners(env["KAFKA_LISTENERS"])
    assert set(protocols) == set(bound)
    for name, (host, _) in bound.items():
        # A plaintext listener (the controller's) is reachable from the broker itself only.
        assert protocols[name] == "SSL" or host in LOOPBACK, f"{name} is plaintext on {host!r}"
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    assert advertised and all(protocols[name] == "SSL" for name in advertised)
    assert protocols[env["KAFKA_INTER_BROKER_LISTENER_NAME"]] == "SSL"
    assert env["KAFKA_SSL_CLIENT_AUTH"] == "required"
    # The image wants JKS keystores for a listener named SSL; these are PEM files.
    assert "SSL://" not in env["KAFKA_ADVERTISED_LISTENERS"]
    assert env["KAFKA_SSL_KEYSTORE_TYPE"] == env["KAFKA_SSL_TRUSTSTORE_TYPE"] == "PEM"
    for key in ("KAFKA_SSL_KEYSTORE_LOCATION", "KAFKA_SSL_TRUSTSTORE_LOCATION"):
        assert mounted_at(services()["kafka"], env[key])["source"].startswith(GENERATED)
    # Its healthcheck is a TLS client too.
    check = " ".join(services()["kafka"]["healthcheck"]["test"])
    assert "--command-config" in check


def test_kafka_clients_connect_over_tls_with_a_client_certificate() -> None:
    internal = listeners(kafka_env()["KAFKA_ADVERTISED_LISTENERS"])["INTERNAL"]
    clients = {
        n: s
        for n, s in mmops_services().items()
        if "KAFKA_BOOTSTRAP_SERVERS" in s.get("environment", {})
    }
    assert {"topics", "consumer"} <= set(clients)
    for name, service in clients.items():
        env = service["environment"]
        host, port = env["KAFKA_BOOTSTRAP_SERVERS"].rsplit(":", 1)
        assert (host, int(port)) == internal, name
        assert env["KAFKA_SECURITY_PROTOCOL"] == "SSL", name
        for key in ("KAFKA_SSL_CAFILE", "KAFKA_SSL_CERTFILE", "KAFKA_SSL_KEYFILE"):
            mount = mounted_at(service, env[key])
            assert mount["source"] == f"{GENERATED}client" and mount["read_only"], (name, key)


def test_make_certs_writes_every_file_compose_mounts(certs: Path) -> None:
    kafka = services()["kafka"]
    env = kafka_env()
    for key in ("KAFKA_SSL_KEYSTORE_LOCATION", "KAFKA_SSL_TRUSTSTORE_LOCATION"):
        assert host_path(kafka, env[key], certs).is_file(), key
    check = services()["kafka"]["healthcheck"]["test"][-1]
    properties_path = re.search(r"--command-config (\S+)", check)[1]
    properties = host_path(kafka, properties_path, certs).read_text()
    for key in ("KAFKA_SSL_KEYSTORE_LOCATION", "KAFKA_SSL_TRUSTSTORE_LOCATION"):
        setting = key.removeprefix("KAFKA_").lower().replace("_", ".")
        assert f"{setting}={env[key]}" in properties
    assert "security.protocol=SSL" in properties
    consumer = services()["consumer"]
    for key in ("KAFKA_SSL_CAFILE", "KAFKA_SSL_CERTFILE", "KAFKA_SSL_KEYFILE"):
        assert host_path(consumer, consumer["environment"][key], certs).is_file(), key
    # The CA's key is mounted nowhere.
    mounted = {m["source"] for s in services().values() for m in mounts(s)}
    assert (certs / "ca/ca.key").is_file() and f"{GENERATED}ca" not in mounted
    assert (certs / "ca/ca.key").stat().st_mode & 0o077 == 0, "the CA key is readable by others"


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> None:
    """A TLS handshake over a socket pair; raises what either side raises."""
    left, right = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server.wrap_socket(left, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(right, server_hostname=hostname) as tls:
            tls.sendall(b"x")
    finally:
        thread.join(timeout=10)
    if errors:
        raise errors[0]


def test_the_broker_certificate_serves_its_names_and_requires_a_client_certificate(
    certs: Path,
) -> None:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs / "kafka/kafka.pem")
    server.load_verify_locations(certs / "kafka/ca.crt")
    server.verify_mode = ssl.CERT_REQUIRED

    def client(name: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=certs / "client/ca.crt")
        if name:
            context.load_cert_chain(certs / f"{name}/{name}.crt", certs / f"{name}/{name}.key")
        return context

    advertised = listeners(kafka_env()["KAFKA_ADVERTISED_LISTENERS"])
    for host, _ in advertised.values():
        handshake(server, client("client"), host)
        handshake(server, client("host"), host)
    with pytest.raises(ssl.SSLError):
        handshake(server, client("client"), "kafka.elsewhere")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(server, client(None), "kafka")


def test_mlflow_requires_a_login_and_its_config_holds_no_secret() -> None:
    mlflow = services()["mlflow"]
    cmd = command(mlflow)
    assert option(cmd, "--app-name") == "basic-auth"
    assert (
        "@" in option(cmd, "--backend-store-uri")
        and ":" not in option(cmd, "--backend-store-uri").split("://")[1].split("@")[0]
    ), "a password on the command line"
    env = mlflow["environment"]
    ini = mounted_at(mlflow, env["MLFLOW_AUTH_CONFIG_PATH"])
    config = configparser.ConfigParser()
    config.read(INFRA / ini["source"])
    auth = config["mlflow"]
    assert "admin_password" not in auth, "the admin password belongs in infra/.env"
    user_info = auth["database_uri"].split("://")[1].split("@")[0]
    assert ":" not in user_info, "a database password in basic_auth.ini"
    database = auth["database_uri"].rsplit("/", 1)[1]
    assert f"CREATE DATABASE {database};" in (INFRA / "postgres/init.sql").read_text()
    assert auth["default_permission"] == "NO_PERMISSIONS"
    raw = raw_environment("mlflow")
    for key in ("PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", raw[key]), f"mlflow: {key} is not required"
    # The server creates the admin its clients log in as.
    assert (
        raw["MLFLOW_AUTH_ADMIN_USERNAME"] == raw_environment("consumer")["MLFLOW_TRACKING_USERNAME"]
    )
    assert (
        raw["MLFLOW_AUTH_ADMIN_PASSWORD"] == raw_environment("consumer")["MLFLOW_TRACKING_PASSWORD"]
    )
    # Its healthcheck reads the one path the auth app leaves open.
    assert "localhost:5000/health'" in " ".join(mlflow["healthcheck"]["test"])


def test_mlflow_clients_log_in() -> None:
    for name in ("consumer", "serve-http", "prefect-worker"):
        env = services()[name]["environment"]
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
        assert env["MLFLOW_TRACKING_USERNAME"] and env["MLFLOW_TRACKING_PASSWORD"], name


def test_prefect_requires_basic_auth_from_every_client() -> None:
    server = raw_environment("prefect-server")["PREFECT_SERVER_API_AUTH_STRING"]
    assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", server)
    clients = [n for n, s in services().items() if "PREFECT_API_URL" in s.get("environment", {})]
    assert {"prefect-worker", "flow-deploy"} <= set(clients)
    for name in clients:
        raw = raw_environment(name)
        # The same `user:password` as the server's; an API key would win over it and fail.
        assert raw["PREFECT_API_AUTH_STRING"] == server, name
        assert "PREFECT_API_KEY" not in raw, name
    assert "localhost:4200/api/health'" in " ".join(
        services()["prefect-server"]["healthcheck"]["test"]
    )


def test_no_credential_has_a_default() -> None:
    required = set()
    for path in COMPOSE_FILES:
        for match in VARIABLE.finditer(path.read_text()):
            if SECRET_NAME.search(match["name"]):
                assert match["op"] not in ("-", ":-"), f"{path.name}: {match[0]} has a default"
                if match["op"] == ":?":
                    required.add(match["name"])
    blank = {k for k, v in env_example().items() if not v}
    assert {k for k in env_example() if SECRET_NAME.search(k)} <= blank <= required
    assert {"MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"} <= required


def test_consumer_healthcheck_reads_healthz() -> None:
    """/metrics answers from its own thread even while the serving loop is stuck; /healthz not."""
    check = " ".join(services()["consumer"]["healthcheck"]["test"])
    port = option(command(services()["consumer"]), "--metrics-port")
    assert f"localhost:{port}/healthz" in check


def test_the_image_installs_what_mlflows_auth_app_imports() -> None:
    """`--app-name basic-auth` imports Flask-WTF (mlflow[auth]): without it MLflow cannot start."""
    dockerfile = (INFRA / "docker/Dockerfile").read_text()
    project = tomllib.loads((INFRA.parent / "pyproject.toml").read_text())["project"]
    extras = re.findall(r'x\["(\w+)"\]', dockerfile)
    assert "server" in extras
    installed = [
        *project["dependencies"],
        *(r for e in extras for r in project["optional-dependencies"][e]),
    ]
    names = {re.split(r"[<>=!~;\s]", r, maxsplit=1)[0].lower() for r in installed}
    assert "flask-wtf" in names or "mlflow[auth]" in names, "add Flask-WTF to the `server` extra"
