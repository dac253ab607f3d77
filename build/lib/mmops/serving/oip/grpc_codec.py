"""The Open Inference Protocol v2 over gRPC: `ModelInferRequest` to an `InferRequest`, and back.

Input tensors come as `raw_input_contents` (what tritonclient sends) or typed `contents`; every
output goes back as `raw_output_contents`, as Triton does: tritonclient's `InferResult.as_numpy`
reads numeric outputs from raw contents only. Raw BYTES are length-prefixed, as in REST's binary
data, so the same `tensors` code reads and writes both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from mmops.serving.oip import grpc_predict_v2_pb2 as pb
from mmops.serving.oip.protocol import (
    InferInput,
    InferRequest,
    InferResponse,
    RequestedOutput,
    TensorMetadata,
)
from mmops.serving.oip.tensors import (
    DATATYPES,
    ProtocolError,
    decode_raw,
    element_count,
    encode_raw,
    parse_datatype,
    parse_shape,
)

# Each datatype's typed field of InferTensorContents and that field's element type; FP16 has
# none (raw contents only).
CONTENTS: dict[str, tuple[str, type]] = {
    "BOOL": ("bool_contents", np.bool_),
    "INT8": ("int_contents", np.int32),
    "INT16": ("int_contents", np.int32),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint32),
    "UINT16": ("uint_contents", np.uint32),
    "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
    "BYTES": ("bytes_contents", bytes),
}
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
}
INT64_MAX = 2**63 - 1


def grpc_status(status: int) -> grpc.StatusCode:
    """The gRPC status code of a `ProtocolError.status` (an HTTP status)."""
    return STATUS_CODES.get(status, grpc.StatusCode.INTERNAL)


def parameter_value(parameter: pb.InferParameter) -> bool | int | float | str | None:
    """The value an `InferParameter` holds, None when none is set."""
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def set_parameter(parameter: pb.InferParameter, value: Any) -> None:
    """Set an `InferParameter` to `value`, in the field tritonclient reads it from."""
    if isinstance(value, np.generic):  # a numpy scalar, e.g. a count from an array
        value = value.item()
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int) and -INT64_MAX - 1 <= value <= INT64_MAX:
        parameter.int64_param = value
    elif isinstance(value, int) and 0 <= value < 2**64:
        parameter.uint64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    elif isinstance(value, str):
        parameter.string_param = value
    else:
        raise ProtocolError(f"parameter value {value!r:.40} has no InferParameter field", 500)


def _parameters(where: str, parameters: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    values = {key: parameter_value(value) for key, value in parameters.items()}
    if "shared_memory_region" in values:
        raise ProtocolError(f"{where}.shared_memory_region: shared memory is not supported")
    return {key: value for key, value in values.items() if value is not None}


def decode_grpc_request(msg: pb.ModelInferRequest, max_bytes: int) -> InferRequest:
    """An `InferRequest` from a `ModelInferRequest`, its tensors raw or typed."""
    size = msg.ByteSize()
    if size > max_bytes:
        raise ProtocolError(f"request: {size} bytes, more than the {max_bytes} allowed", 413)
    if not msg.inputs:
        raise ProtocolError("inputs: expected at least one input tensor")
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise ProtocolError(
            f"raw_input_contents: {len(raw)} entries for {len(msg.inputs)} inputs; "
            "raw contents need one per input, in input order"
        )
    inputs: dict[str, InferInput] = {}
    for index, tensor in enumerate(msg.inputs):
        decoded = _decode_input(index, tensor, raw[index] if raw else None)
        if decoded.name in inputs:
            raise ProtocolError(f"inputs[{index}].name: {decoded.name!r:.80} given twice")
        inputs[decoded.name] = decoded
    outputs: list[RequestedOutput] = []
    for index, output in enumerate(msg.outputs):
        if not output.name or output.name in {seen.name for seen in outputs}:
            raise ProtocolError(f"outputs[{index}].name: {output.name!r:.80} empty or twice")
        where = f"outputs.{output.name}.parameters"
        outputs.append(RequestedOutput(output.name, None, _parameters(where, output.parameters)))
    return InferRequest(
        id=msg.id or None,
        inputs=inputs,
        outputs=outputs,
        parameters=_parameters("parameters", msg.parameters),
        model_name=msg.model_name,
        model_version=msg.model_version,
    )


def _decode_input(
    index: int, tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None
) -> InferInput:
    if not tensor.name:
        raise ProtocolError(f"inputs[{index}].name: expected a non-empty string")
    where = f"inputs.{tensor.name}"
    datatype = parse_datatype(where, tensor.datatype)
    shape = parse_shape(where, list(tensor.shape))
    parameters = _parameters(f"{where}.parameters", tensor.parameters)
    if raw is None:
        data = _from_contents(where, datatype, shape, tensor.contents)
    elif tensor.HasField("contents"):
        raise ProtocolError(f"{where}.contents: given as well as raw_input_contents")
    else:
        data = decode_raw(where, datatype, shape, raw)
    return InferInput(tensor.name, datatype, shape, data, parameters)


def _from_contents(
    where: str, datatype: str, shape: list[int], contents: pb.InferTensorContents
) -> np.ndarray | list[bytes]:
    if datatype not in CONTENTS:
        raise ProtocolError(f"{where}.contents: {datatype} travels as raw_input_contents only")
    name, wire = CONTENTS[datatype]
    values, count = getattr(contents, name), element_count(shape)
    if len(values) != count:
        raise ProtocolError(
            f"{where}.contents.{name}: {len(values)} elements, {shape} needs {count}"
        )
    if wire is bytes:
        return list(values)
    array = np.fromiter(values, wire, count=count)
    dtype = DATATYPES[datatype]
    if count and dtype.kind in "iu" and dtype.itemsize < array.dtype.itemsize:
        limits = np.iinfo(dtype)
        if array.min() < limits.min or array.max() > limits.max:
            raise ProtocolError(f"{where}.contents.{name}: a value is out of {datatype}'s range")
    return array.astype(dtype).reshape(shape)


def encode_grpc_response(response: InferResponse) -> pb.ModelInferResponse:
    """A `ModelInferResponse` with every output as raw contents, in output order."""
    msg = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version or "",
        id=response.id or "",
    )
    for key, value in response.parameters.items():
        set_parameter(msg.parameters[key], value)
    for output in response.outputs:
        tensor = msg.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        for key, value in output.parameters.items():
            set_parameter(tensor.parameters[key], value)
        where = f"outputs.{output.name}"
        msg.raw_output_contents.append(
            encode_raw(where, output.datatype, output.shape, output.data)
        )
    return msg


def server_metadata(
    name: str, version: str, extensions: Sequence[str]
) -> pb.ServerMetadataResponse:
    """The gRPC server metadata response."""
    return pb.ServerMetadataResponse(name=name, version=version, extensions=list(extensions))


def model_metadata(
    name: str,
    versions: Sequence[str],
    platform: str,
    inputs: Sequence[TensorMetadata],
    outputs: Sequence[TensorMetadata],
) -> pb.ModelMetadataResponse:
    """The gRPC model metadata response; a shape's -1 is a dimension of any size."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=name,
        versions=list(versions),
        platform=platform,
        inputs=[tensor(name=n, datatype=d, shape=list(s)) for n, d, s in inputs],
        outputs=[tensor(name=n, datatype=d, shape=list(s)) for n, d, s in outputs],
    )
