"""`mmops serve-http`: the v2 server, REST (uvicorn) and gRPC over one batcher and one model."""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict
from typing import Any

from mmops.config import Params
from mmops.serving.champion import ModelSource
from mmops.serving.logs import log_data
from mmops.serving.oip.grpc_server import InferenceServicer, grpc_server
from mmops.serving.oip.http import RestApi
from mmops.serving.oip.metrics import ServerMetrics
from mmops.serving.oip.service import InferenceService

log = logging.getLogger(__name__)


class OipServer:
    """The model (pinned, or the champion followed), its batcher, the REST app and gRPC."""

    def __init__(self, params: Params, model_ref: str, name: str | None = None) -> None:
        cfg = params.serve
        self.params = params
        self.source = ModelSource(model_ref, params.predict, cfg.model_poll_s)
        self.metrics = ServerMetrics(cfg.max_batch_size)
        batching = {
            "max_batch": cfg.max_batch_size,
            "max_wait_s": cfg.max_wait_ms / 1000,
            "target_s": cfg.latency_target_ms / 1000,
            "max_queue": cfg.max_queue,
            "on_batch": self.metrics.on_batch,
        }
        self.service = InferenceService(self.source, batching, name, on_swap=self._swapped)
        limits = asdict(cfg)
        self.rest = RestApi(self.service, self.metrics, limits, self.problem)
        self.servicer = InferenceServicer(
            self.service, self.metrics, cfg.max_body_bytes, cfg.request_timeout_s
        )
        self._grpc: Any = None
        self._http: Any = None
        self._stop = threading.Event()
        self.load_error: str | None = None  # why the first load failed, once it has

    def problem(self) -> str | None:
        """Why the server is not live (the first load failed, a stuck batch, requests
        unserved), or None."""
        if self.load_error is not None:
            return self.load_error
        return self.service.batcher.stalled(self.params.serve.liveness_timeout_s)

    def load(self) -> None:
        """Load the model; a followed champion that is damaged is waited out."""
        predictor = self.source.load(self._stop)
        if predictor is not None:
            self._swapped()
            log.info(
                "serving",
                extra=log_data(
                    model=predictor.identity.name,
                    version=predictor.identity.version,
                    backend=predictor.backend,
                ),
            )

    def _load_followed(self) -> None:
        try:
            self.load()
        except Exception as error:  # the registry is unreachable at start, say: not live
            self.load_error = f"cannot load {self.source.model_ref}: {error}"[:1000]
            log.error("model load failed", extra=log_data(error=self.load_error))

    def _swapped(self) -> None:
        predictor = self.source.current
        if predictor is not None:
            identity = predictor.identity
            self.metrics.serving(self.service.name, identity.version, predictor.backend)
            if self.service.swaps:
                self.metrics.swaps.inc()

    def run(self, host: str, port: int, grpc_port: int | None) -> None:
        """Serve until signalled (uvicorn handles SIGTERM and Ctrl-C), then close everything."""
        import uvicorn

        if self.source.follow:
            # The routes answer while the champion loads (ready once it has): a damaged
            # champion is waited out with the probes up, as the consumer does.
            threading.Thread(target=self._load_followed, name="oip-load", daemon=True).start()
        else:
            self.load()  # a pinned model that cannot load fails the command
        if grpc_port:
            address = f"[{host}]:{grpc_port}" if ":" in host else f"{host}:{grpc_port}"
            workers = self.params.serve.grpc_workers
            self._grpc = grpc_server(self.servicer, address, workers)
        config = uvicorn.Config(
            self.rest.app(), host=host, port=port, log_level="warning", access_log=False
        )
        self._http = uvicorn.Server(config)
        try:
            self._http.run()
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()
        if self._http is not None:
            self._http.should_exit = True

    def close(self) -> None:
        self._stop.set()
        if self._grpc is not None:
            self._grpc.stop(grace=5).wait()
        self.service.batcher.close()
        self.source.close()
