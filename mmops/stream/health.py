"""The consumer's liveness: is the serving loop turning, and is no prediction stuck?

`/healthz` answers from the loop's own heartbeats, not from the thread that serves `/metrics`,
so a consumer stalled in a call or on a prediction that never returns fails its probe and is
restarted. Waiting for the brokers is not a stall: the loop keeps beating while it retries.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

# Before the loop starts, the first model load (a download of hundreds of MB, say) may take this
# many times the timeout without failing the probe.
STARTUP_FACTOR = 10


class Liveness:
    """Heartbeats of the serving loop and the start times of the predictions running."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self.last_beat = clock()
        self.started = False
        self._running: dict[int, float] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        """The model is loaded and the serving loop begins: the plain timeout applies."""
        self.started = True
        self.beat()

    def beat(self) -> None:
        """The serving loop went round once (or is waiting on the brokers, not stuck)."""
        self.last_beat = self.clock()

    def predicting(self, job: int) -> None:
        with self._lock:
            self._running[job] = self.clock()

    def predicted(self, job: int) -> None:
        with self._lock:
            self._running.pop(job, None)

    def problem(self) -> str | None:
        """Why the consumer is not live, or None."""
        now = self.clock()
        if not self.started:
            limit = self.timeout_s * STARTUP_FACTOR
            if now - self.last_beat > limit:
                return f"still starting after {now - self.last_beat:.0f} s"
            return None
        if now - self.last_beat > self.timeout_s:
            return f"serving loop stuck for {now - self.last_beat:.0f} s"
        with self._lock:
            oldest = min(self._running.values(), default=now)
        if now - oldest > self.timeout_s:
            return f"a prediction has run for {now - oldest:.0f} s"
        return None


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds
        pass


def health_app(liveness: Liveness, metrics_app: Callable[..., Iterable[bytes]]) -> Any:
    """A WSGI app: `/healthz` from `liveness`, everything else the Prometheus exposition."""

    def app(request: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if request.get("PATH_INFO") != "/healthz":
            return metrics_app(request, start_response)
        problem = liveness.problem()
        status = "503 Service Unavailable" if problem else "200 OK"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [(problem or "ok").encode() + b"\n"]

    return app


def serve_http(app: Any, port: int, host: str = "0.0.0.0") -> WSGIServer:
    """Serve `app` on `port` from a daemon thread; `shutdown()` the result to stop."""
    server = make_server(host, port, app, _ThreadingServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="mmops-http", daemon=True).start()
    return server
