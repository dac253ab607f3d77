"""The v2 REST routes (Starlette): health, metadata, inference, liveness and metrics.

Inference takes JSON and the binary tensor data extension; a plain JSON route (`/predict`)
takes the records `predict_batch` takes.

Inference waits for its batch on the event loop (the batcher's future, wrapped), so thousands of
waiting requests cost no thread each. A body is refused with 413 from its Content-Length before
it is read, and again while it streams in; every client error is a 4xx whose `error` names the
field.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from mmops.serving.oip.batcher import Overloaded
from mmops.serving.oip.metrics import ServerMetrics
from mmops.serving.oip.protocol import (
    HEADER_LENGTH,
    ProtocolError,
    binary_outputs,
    decode_rest_request,
    decompress,
    encode_rest_response,
    error_body,
    model_metadata,
    server_metadata,
)
from mmops.serving.oip.service import INPUTS, OUTPUTS, InferenceService

EXTENSIONS = ("binary_tensor_data", "model_repository_health")
SERVER_NAME = "mmops"
Handler = Callable[[Request], Awaitable[Response]]


def server_version() -> str:
    try:
        return version("mmops")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "0"


def tensor_metadata(labels: int) -> tuple[list[Any], list[Any]]:
    """The model's input and output tensors, as metadata lists them (-1: any size)."""
    inputs = [(name, "BYTES", [-1]) for name in INPUTS]
    outputs = [("label", "BYTES", [-1]), ("scores", "FP32", [-1, labels])]
    outputs.append(("model_version", "BYTES", [-1]))
    assert [name for name, _, _ in outputs] == list(OUTPUTS)
    return inputs, outputs


class RestApi:
    """The routes over an `InferenceService`, its liveness and its metrics."""

    def __init__(
        self,
        service: InferenceService,
        metrics: ServerMetrics,
        limits: dict[str, float],
        problem: Callable[[], str | None],
    ) -> None:
        self.service, self.metrics, self.problem = service, metrics, problem
        self.max_body = int(limits["max_body_bytes"])
        self.timeout_s = float(limits["request_timeout_s"])

    def app(self) -> Starlette:
        infer, meta, ready = self.infer, self.model_metadata, self.model_ready
        routes = [
            Route("/v2/health/live", self.live),
            Route("/v2/health/ready", self.ready),
            Route("/healthz", self.live),
            Route("/readyz", self.ready),
            Route("/metrics", self.metrics_page),
            Route("/v2", self.server_metadata),
            Route("/v2/models/{name}", meta),
            Route("/v2/models/{name}/versions/{version}", meta),
            Route("/v2/models/{name}/ready", ready),
            Route("/v2/models/{name}/versions/{version}/ready", ready),
            Route("/v2/models/{name}/infer", infer, methods=["POST"]),
            Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
            Route("/predict", self.predict, methods=["POST"]),
        ]
        return Starlette(routes=routes)

    async def live(self, request: Request) -> Response:
        problem = self.problem()
        return PlainTextResponse(problem or "ok", 503 if problem else 200)

    async def ready(self, request: Request) -> Response:
        problem = self.problem() or (None if self.service.predictor else "no model loaded yet")
        return PlainTextResponse(problem or "ok", 503 if problem else 200)

    async def metrics_page(self, request: Request) -> Response:
        self.metrics.queued.set(self.service.batcher.queued)
        self.metrics.batch_cap.set(self.service.batcher.stats.cap)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def server_metadata(self, request: Request) -> Response:
        return _json(server_metadata(SERVER_NAME, server_version(), EXTENSIONS))

    async def model_metadata(self, request: Request) -> Response:
        try:
            predictor = self.service.check_model(*_model(request))
        except ProtocolError as error:
            return _error(error)
        inputs, outputs = tensor_metadata(len(predictor.labels))
        platform = "onnxruntime_onnx" if predictor.backend != "torch" else "pytorch_torch"
        document = model_metadata(
            self.service.name, [predictor.identity.version], platform, inputs, outputs
        )
        # Not in the protocol, and what a client needs to read `scores`.
        document["parameters"] = {"labels": predictor.labels, "backend": predictor.backend}
        return _json(document)

    async def model_ready(self, request: Request) -> Response:
        try:
            self.service.check_model(*_model(request))
        except ProtocolError as error:
            return _error(error)
        return Response(status_code=200)

    async def infer(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            self.service.check_model(*_model(request))  # a 404 before the body is read
            body = await self._body(request)
            infer = decode_rest_request(body, request.headers.get(HEADER_LENGTH), self.max_body)
            infer.model_name, infer.model_version = _model(request)
            response = await self._run(infer)
            names = [output.name for output in response.outputs]
            content, headers = encode_rest_response(response, binary_outputs(infer, names))
            answer = Response(content, 200, headers=headers)
        except ProtocolError as error:
            answer = _error(error)
        except Overloaded as error:
            answer = _error(ProtocolError(str(error), 503))
        self.metrics.requests.labels("rest", str(answer.status_code)).inc()
        self.metrics.latency.labels("rest").observe(time.perf_counter() - started)
        return answer

    async def _run(self, infer: Any) -> Any:
        pending = self.service.start(infer)
        try:
            outcome = await asyncio.wait_for(asyncio.wrap_future(pending.future), self.timeout_s)
        except TimeoutError:
            raise ProtocolError(
                f"no result within {self.timeout_s:g} s (server busy)", 503
            ) from None
        return self.service.finish(pending, outcome)

    async def predict(self, request: Request) -> Response:
        """Records as `predict_batch` takes them (images base64), one result per record."""
        try:
            body = await self._body(request)
            records = _records(body)
            self.service.check_model(self.service.name)
            future = self.service.batcher.submit(records)
            waiting = asyncio.wrap_future(future)
            outcome = await asyncio.wait_for(waiting, self.timeout_s)
        except ProtocolError as error:
            return _error(error)
        except Overloaded as error:
            return _error(ProtocolError(str(error), 503))
        except TimeoutError:
            return _error(ProtocolError(f"no result within {self.timeout_s:g} s", 503))
        return _json({"predictions": [result for _, result in outcome]})

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise ProtocolError(
                f"body: {declared} bytes exceeds serve.max_body_bytes ({self.max_body})", 413
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise ProtocolError(f"body: over serve.max_body_bytes ({self.max_body} bytes)", 413)
            chunks.append(chunk)
        body = b"".join(chunks)
        return decompress(body, request.headers.get("content-encoding"), self.max_body)


def _model(request: Request) -> tuple[str, str | None]:
    return request.path_params["name"], request.path_params.get("version")


def _records(body: bytes) -> list[Any]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise ProtocolError(f"body: not JSON ({error})") from None
    records = document.get("records") if isinstance(document, dict) else document
    if not isinstance(records, list) or not records:
        raise ProtocolError('body: expected a non-empty list of records, or {"records": [...]}')
    return records


def _json(document: Any, status: int = 200) -> Response:
    content = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(content, status, media_type="application/json")


def _error(error: ProtocolError) -> Response:
    return Response(error_body(str(error)), error.status, media_type="application/json")
