"""The consumer's liveness: is the serving loop turning, and does what waits get served?

`/healthz` answers from the loop's own heartbeats, not from the thread that serves `/metrics`,
so a consumer stalled in a call or on a prediction that never returns fails its probe and is
restarted. Waiting for the brokers is not a stall by itself: the loop keeps beating while it
retries. But events waiting with no prediction acknowledged for the timeout fail the probe
whatever the cause (a client in a state it cannot leave, a broker that takes reads and refuses
writes): a restart is then the best left to try. `/readyz` is 503 until a model serves.
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
        self.last_ack = clock()
        self.started = False
        self.not_ready: str | None = "starting"  # why /readyz fails; None once a model serves
        self._waiting = 0
        self._waiting_since = clock()
        self._running: dict[int, float] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        """The model is loaded and the serving loop begins: the plain timeout applies."""
        self.started = True
        self.not_ready = None
        self.beat()
        self.acked()

    def acked(self) -> None:
        """The broker acknowledged a batch's output."""
        self.last_ack = self.clock()

    def waiting(self, events: int) -> None:
        """How many events wait to be served: in hand, or behind the partitions' ends."""
        if events > 0 and self._waiting <= 0:
            self._waiting_since = self.clock()
        self._waiting = events

    def since_ack(self) -> float:
        return self.clock() - self.last_ack

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
        unserved = now - max(self.last_ack, self._waiting_since)
        if self._waiting > 0 and unserved > self.timeout_s:
            return f"{self._waiting} events wait and none was acknowledged for {unserved:.0f} s"
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
    """A WSGI app: `/healthz` and `/readyz` from `liveness`, everything else the Prometheus
    exposition."""

    def app(request: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = request.get("PATH_INFO")
        if path not in ("/healthz", "/readyz"):
            return metrics_app(request, start_response)
        problem = liveness.problem()
        if path == "/readyz":
            problem = liveness.not_ready or problem
        status = "503 Service Unavailable" if problem else "200 OK"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [(problem or "ok").encode() + b"\n"]

    return app


def serve_http(app: Any, port: int, host: str = "0.0.0.0") -> WSGIServer:
    """Serve `app` on `port` from a daemon thread; `shutdown()` the result to stop."""
    server = make_server(host, port, app, _ThreadingServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="mmops-http", daemon=True).start()
    return server
