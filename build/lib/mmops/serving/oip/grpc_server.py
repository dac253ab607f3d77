"""The v2 gRPC service (`inference.GRPCInferenceService`) over the same `InferenceService`."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from mmops.serving.oip import grpc_predict_v2_pb2 as pb
from mmops.serving.oip.batcher import Overloaded
from mmops.serving.oip.grpc_codec import (
    decode_grpc_request,
    encode_grpc_response,
    grpc_status,
    model_metadata,
    server_metadata,
)
from mmops.serving.oip.grpc_predict_v2_pb2_grpc import (
    GRPCInferenceServiceServicer,
    add_GRPCInferenceServiceServicer_to_server,
)
from mmops.serving.oip.http import EXTENSIONS, SERVER_NAME, server_version, tensor_metadata
from mmops.serving.oip.metrics import ServerMetrics
from mmops.serving.oip.protocol import ProtocolError
from mmops.serving.oip.service import InferenceService


class InferenceServicer(GRPCInferenceServiceServicer):
    """Health, metadata and inference; errors as gRPC status codes with the field named."""

    def __init__(
        self, service: InferenceService, metrics: ServerMetrics, max_bytes: int, timeout_s: float
    ) -> None:
        self.service, self.metrics = service, metrics
        self.max_bytes, self.timeout_s = max_bytes, timeout_s

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.service.predictor is not None)

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            self.service.check_model(request.name, request.version)
        except ProtocolError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return server_metadata(SERVER_NAME, server_version(), EXTENSIONS)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            predictor = self.service.check_model(request.name, request.version)
        except ProtocolError as error:
            context.abort(grpc_status(error.status), str(error))
        inputs, outputs = tensor_metadata(len(predictor.labels))
        platform = "onnxruntime_onnx" if predictor.backend != "torch" else "pytorch_torch"
        version = predictor.identity.version
        return model_metadata(self.service.name, [version], platform, inputs, outputs)

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        started = time.perf_counter()
        code = "OK"
        try:
            infer = decode_grpc_request(request, self.max_bytes)
            return encode_grpc_response(self.service.infer(infer, self.timeout_s))
        except (ProtocolError, Overloaded) as error:
            status = error.status if isinstance(error, ProtocolError) else 503
            code = grpc_status(status).name
            context.abort(grpc_status(status), str(error))
        finally:
            self.metrics.requests.labels("grpc", code).inc()
            self.metrics.latency.labels("grpc").observe(time.perf_counter() - started)


def grpc_server(servicer: InferenceServicer, address: str, workers: int) -> grpc.Server:
    """A started gRPC server on `address` (host:port)."""
    limit = servicer.max_bytes
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="oip-grpc"),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )
    add_GRPCInferenceServiceServicer_to_server(servicer, server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"gRPC: cannot listen on {address}")
    server.start()
    return server
