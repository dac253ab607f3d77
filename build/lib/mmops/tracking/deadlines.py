"""How long a call to the tracking server may take (`tracking` in params.yaml, handed to MLflow),
and what MLflow raises once a server did not answer in that time.

MLflow reads MLFLOW_HTTP_REQUEST_* on every request (`mlflow.utils.rest_utils.http_request`; its
sessions are cached by those values), so setting them applies at once to every client of the
process, made before or after. A value the user set in the environment wins. Prefect's client
reads PREFECT_API_REQUEST_TIMEOUT (60 s) and PREFECT_CLIENT_MAX_RETRIES (5) once, when prefect
is imported, which the CLI does before it reads params: set those in the deployment instead.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from mmops.config import TrackingConfig

# TrackingConfig field -> the MLflow environment setting that carries it.
HTTP_SETTINGS = {
    "request_timeout_s": "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "max_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "backoff_factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "backoff_jitter": "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
}
# What this process set, so a later call may change its own values but never the user's.
_applied: dict[str, str] = {}


def http_environment(tracking: TrackingConfig) -> dict[str, str]:
    """The MLFLOW_HTTP_REQUEST_* values that `tracking` asks for."""
    return {env: str(getattr(tracking, key)) for key, env in HTTP_SETTINGS.items()}


def apply_deadlines(tracking: TrackingConfig) -> dict[str, str]:
    """Set MLflow's HTTP deadlines from `tracking`, but none the user set; return those in force."""
    for name, value in http_environment(tracking).items():
        current = os.environ.get(name)
        if current is None or current == _applied.get(name):
            os.environ[name] = _applied[name] = value
    return {name: os.environ[name] for name in HTTP_SETTINGS.values()}


def worst_case_s(timeout_s: float, retries: int, factor: float, jitter: float) -> float:
    """The longest one MLflow call waits on a server that never answers: every try times out.

    urllib3 waits 0 s before the first retry, then factor * 2, factor * 4 ... (at most 120 s)
    plus up to `jitter`.
    """
    waits = sum(min(120.0, factor * 2**k + jitter) for k in range(1, retries))
    return (retries + 1) * timeout_s + waits


@dataclass(frozen=True)
class Outage:
    """A tracking server that did not answer: where (no credentials), why, and during what."""

    server: str
    cause: str
    endpoint: str | None


# What the exceptions' text says, as a short cause; the text itself may carry a URL with a
# password, so only these fixed phrases are ever shown.
_CAUSES = (
    (re.compile(r"connection refused", re.I), "connection refused"),
    (re.compile(r"timed out|timeout", re.I), "timed out"),
    (
        re.compile(r"name or service not known|nodename nor servname|name resolution", re.I),
        "unknown host",
    ),
    (re.compile(r"ssl|certificate", re.I), "TLS failed"),
    (re.compile(r"too many (\d{3}) error responses"), "HTTP {0} on every try"),
    (re.compile(r"connection (reset|aborted)|remotedisconnected", re.I), "connection dropped"),
)
_API = re.compile(r"API request to (\S+) failed with (timeout )?exception")


def outage(exc: BaseException, tracking_uri: str) -> Outage | None:
    """The outage behind `exc` (MLflow's error after its retries, or a requests error anywhere
    in the chain of causes), or None for any other error."""
    chain = _chain(exc)
    texts = [str(e) for e in chain]
    url = next((m.group(1) for t in texts if (m := _API.search(t))), None)
    if url is None:  # a bare requests error counts only if it was a request to the server
        base = redacted(tracking_uri).rstrip("/")
        requested = (_requested_url(e) for e in chain)
        url = next((u for u in requested if u and redacted(u).startswith(base + "/")), None)
    if url is None or not url.startswith(("http://", "https://")):
        return None
    cause = "no answer"
    for pattern, phrase in _CAUSES:
        if found := next((m for t in texts if (m := pattern.search(t))), None):
            cause = phrase.format(*found.groups())
            break
    if cause == "timed out":
        tries = int(os.environ.get(HTTP_SETTINGS["max_retries"]) or 7) + 1
        timeout = os.environ.get(HTTP_SETTINGS["request_timeout_s"]) or "120"
        cause = f"timed out: {tries} tries of {timeout} s"
    server, endpoint = _split(url or tracking_uri)
    return Outage(server, cause, endpoint)


def redacted(uri: str) -> str:
    """`uri` without user, password, query or fragment."""
    parts = urlsplit(uri)
    if not parts.netloc:
        return uri.split("?")[0]
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return f"{parts.scheme}://{netloc}{parts.path}"


def _split(url: str) -> tuple[str, str | None]:
    """The server part of a request URL, and the endpoint (e.g. `model-versions/search`)."""
    clean = redacted(url)
    found = re.search(r"/(ajax-)?api/\d\.\d/(mlflow(-artifacts)?/)?", clean)
    if found is None:
        return clean.rstrip("/"), None
    return clean[: found.start()], clean[found.end() :] or None


def _requested_url(exc: BaseException) -> str | None:
    if not type(exc).__module__.startswith("requests"):
        return None
    return getattr(getattr(exc, "request", None), "url", None)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen
