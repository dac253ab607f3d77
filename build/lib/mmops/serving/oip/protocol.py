"""The Open Inference Protocol v2 over REST: typed requests and responses, JSON and binary tensors.

The codec is transport-neutral where it can be: `InferRequest` and `InferResponse` are what the
server sees from REST and gRPC alike (`grpc_codec` maps the gRPC messages to them). REST bodies
are JSON, or a JSON header of `Inference-Header-Content-Length` bytes followed by the binary
tensor data extension's blobs, in input (or output) order. Every malformed body is a
`ProtocolError` naming the field, never another exception.

BYTES elements are `bytes` on both paths. In JSON they are strings, passed on UTF-8 encoded with
`InferInput.from_json` set: a client sending binary content as JSON sends it as text (base64 for
an image), which the server decodes; from binary data they are the raw bytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from mmops.serving.oip.tensors import (
    DATATYPES,
    MAX_DIMS,
    ProtocolError,
    Tensor,
    as_bytes,
    decode_raw,
    element_count,
    encode_raw,
    flat_items,
    parse_datatype,
    parse_shape,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
# What numpy infers from JSON numbers that each datatype accepts ("b" bool, "i"/"u" int, "f" float).
JSON_KINDS = {"b": {"b"}, "u": {"i", "u"}, "i": {"i", "u"}, "f": {"i", "u", "f"}}
TensorMetadata = tuple[str, str, Sequence[int]]  # name, datatype, shape (-1: any size)


@dataclass
class InferInput:
    """One input tensor: BYTES as a list of `bytes`, the rest a numpy array of `shape`."""

    name: str
    datatype: str
    shape: list[int]
    # Numeric tensors from binary data (REST) or raw contents (gRPC) are read-only views, no copy.
    data: Tensor
    parameters: dict[str, Any] = field(default_factory=dict)
    from_json: bool = False  # BYTES given as JSON strings (UTF-8 encoded here): text to decode


@dataclass
class RequestedOutput:
    """An output the client asked for; `binary` is its `binary_data` parameter, None when unset."""

    name: str
    binary: bool | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    """An inference request, from REST or gRPC; REST leaves the model to the URL."""

    id: str | None
    inputs: dict[str, InferInput]
    outputs: list[RequestedOutput] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    binary_output: bool = False  # the request's `binary_data_output` parameter
    model_name: str = ""
    model_version: str = ""


@dataclass
class InferOutput:
    """One output tensor: BYTES as a list of `bytes` (or `str`), the rest anything numpy takes."""

    name: str
    datatype: str
    shape: list[int]
    data: Any
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferResponse:
    """An inference response, for REST or gRPC."""

    model_name: str
    model_version: str | None
    id: str | None
    outputs: list[InferOutput]
    parameters: dict[str, Any] = field(default_factory=dict)


def decompress(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """A request body undone from its `Content-Encoding`, at most `max_bytes` of it (else 413)."""
    name = (encoding or "identity").strip().lower()
    wbits = {"gzip": 31, "x-gzip": 31, "deflate": 15}.get(name)
    if name != "identity" and wbits is None:
        raise ProtocolError(f"Content-Encoding: {encoding!r:.40} is not supported", 415)
    if len(body) > max_bytes:
        raise ProtocolError(f"body: {len(body)} bytes, more than the {max_bytes} allowed", 413)
    if wbits is None:
        return body
    parts, left, rest = [], max_bytes, body
    while rest:  # a gzip body may be several members, one after the other
        inflater = zlib.decompressobj(wbits)
        try:
            part = inflater.decompress(rest, left + 1)
        except zlib.error as error:
            raise ProtocolError(f"body: not valid {name} data ({error})") from None
        if len(part) > left:
            raise ProtocolError(f"body: inflates past the {max_bytes} bytes allowed", 413)
        if not inflater.eof:
            raise ProtocolError(f"body: {name} data ends early")
        parts.append(part)
        left -= len(part)
        rest = inflater.unused_data
        if rest and wbits == 15:
            raise ProtocolError(f"body: bytes after the end of the {name} data")
    return b"".join(parts)


def parse_parameters(where: str, parameters: Any) -> dict[str, Any]:
    """A `parameters` object: string keys, string, number or boolean values."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ProtocolError(f"{where}: expected an object, got {type(parameters).__name__}")
    for key, value in parameters.items():
        if not isinstance(value, str | int | float | bool):
            raise ProtocolError(f"{where}.{key}: expected a string, number or boolean")
    return parameters


def _load_header(
    body: bytes, header_length: int | str | None, max_bytes: int
) -> tuple[dict[str, Any], memoryview]:
    if len(body) > max_bytes:
        raise ProtocolError(f"body: {len(body)} bytes, more than the {max_bytes} allowed", 413)
    if header_length is None:
        header_length = len(body)
    elif isinstance(header_length, str):
        if not (header_length.isascii() and header_length.strip().isdigit()):
            raise ProtocolError(f"{HEADER_LENGTH}: {header_length!r:.40} is not a byte count")
        header_length = int(header_length)
    if not isinstance(header_length, int) or not 0 < header_length <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH}: {header_length!r:.40} outside the {len(body)} bytes")
    try:
        header = orjson.loads(memoryview(body)[:header_length])
    except orjson.JSONDecodeError as error:
        raise ProtocolError(f"body: not a JSON object ({error})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"body: expected a JSON object, got {type(header).__name__}")
    return header, memoryview(body)[header_length:]


def decode_rest_request(
    body: bytes, header_length: int | str | None, max_bytes: int
) -> InferRequest:
    """An `InferRequest` from a REST body: JSON, or a JSON header and binary tensor data."""
    header, blobs = _load_header(body, header_length, max_bytes)
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f"id: expected a string, got {type(request_id).__name__}")
    parameters = parse_parameters("parameters", header.get("parameters"))
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise ProtocolError("parameters.binary_data_output: expected a boolean")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("inputs: expected a non-empty list of input tensors")
    inputs: dict[str, InferInput] = {}
    offset = 0
    for index, raw in enumerate(raw_inputs):
        tensor, offset = _decode_input(index, raw, blobs, offset)
        if tensor.name in inputs:
            raise ProtocolError(f"inputs[{index}].name: {tensor.name!r:.80} given twice")
        inputs[tensor.name] = tensor
    if offset != len(blobs):
        raise ProtocolError(
            f"body: {len(blobs) - offset} bytes after the inputs' binary data "
            f"(their binary_data_size add up to {offset})"
        )
    outputs = _decode_outputs(header.get("outputs"))
    return InferRequest(request_id, inputs, outputs, parameters, binary_output)


def _decode_input(index: int, raw: Any, blobs: memoryview, offset: int) -> tuple[InferInput, int]:
    if not isinstance(raw, dict):
        raise ProtocolError(f"inputs[{index}]: expected an object, got {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"inputs[{index}].name: expected a non-empty string")
    where = f"inputs.{name}"
    datatype = parse_datatype(where, raw.get("datatype"))
    shape = parse_shape(where, raw.get("shape"))
    parameters = parse_parameters(f"{where}.parameters", raw.get("parameters"))
    if "shared_memory_region" in parameters:
        raise ProtocolError(f"{where}.parameters.shared_memory_region: shared memory unsupported")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in raw:
            raise ProtocolError(f"{where}.data: missing (and no binary_data_size)")
        data, from_json = _decode_json_data(where, datatype, shape, raw["data"]), True
    else:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ProtocolError(f"{where}.parameters.binary_data_size: {size!r:.40} not a size")
        if "data" in raw:
            raise ProtocolError(f"{where}.data: given as well as binary_data_size")
        if offset + size > len(blobs):
            raise ProtocolError(
                f"{where}.parameters.binary_data_size: {size} bytes from offset {offset} run "
                f"past the {len(blobs)} bytes of binary data"
            )
        data = decode_raw(where, datatype, shape, blobs[offset : offset + size])
        from_json, offset = False, offset + size
    return InferInput(name, datatype, shape, data, parameters, from_json), offset


def _flatten(where: str, data: Any) -> list[Any]:
    # The spec allows nested rows as well as one flat list; flatten a level at a time.
    if not isinstance(data, list):
        raise ProtocolError(f"{where}: expected a list of elements, got {type(data).__name__}")
    for _ in range(MAX_DIMS + 1):
        nested = [isinstance(item, list) for item in data]
        if not any(nested):
            return data
        if not all(nested):
            raise ProtocolError(f"{where}: mixes nested lists and elements")
        data = [item for row in data for item in row]
    raise ProtocolError(f"{where}: nested deeper than {MAX_DIMS} levels")


def _decode_json_data(where: str, datatype: str, shape: list[int], data: Any) -> Tensor:
    items, count = _flatten(f"{where}.data", data), element_count(shape)
    if len(items) != count:
        raise ProtocolError(f"{where}.shape: {shape} needs {count} elements, data has {len(items)}")
    dtype = DATATYPES[datatype]
    if dtype is None:
        for position, item in enumerate(items):
            if not isinstance(item, str):
                raise ProtocolError(f"{where}.data[{position}]: BYTES in JSON must be strings")
        return [item.encode() for item in items]
    try:
        array = np.array(items)
    except (ValueError, TypeError, OverflowError):
        array = np.array(items, dtype=object)
    if count and array.dtype.kind not in JSON_KINDS[dtype.kind]:
        raise ProtocolError(f"{where}.data: elements are not all {datatype} values")
    if count and dtype.kind in "iu":
        limits = np.iinfo(dtype)
        if array.min() < limits.min or array.max() > limits.max:
            raise ProtocolError(f"{where}.data: a value is out of {datatype}'s range")
    with np.errstate(over="ignore"):  # FP16 and FP32 overflow to inf, as a cast does
        return array.astype(dtype).reshape(shape)


def _decode_outputs(raw_outputs: Any) -> list[RequestedOutput]:
    if raw_outputs is None:
        return []
    if not isinstance(raw_outputs, list):
        raise ProtocolError("outputs: expected a list of requested outputs")
    outputs, seen = [], set()
    for index, raw in enumerate(raw_outputs):
        name = raw.get("name") if isinstance(raw, dict) else None
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"outputs[{index}].name: expected a non-empty string")
        if name in seen:
            raise ProtocolError(f"outputs[{index}].name: {name!r:.80} requested twice")
        parameters = parse_parameters(f"outputs.{name}.parameters", raw.get("parameters"))
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise ProtocolError(f"outputs.{name}.parameters.binary_data: expected a boolean")
        if "shared_memory_region" in parameters:
            raise ProtocolError(f"outputs.{name}.parameters.shared_memory_region: unsupported")
        outputs.append(RequestedOutput(name, binary, parameters))
        seen.add(name)
    return outputs


def binary_outputs(request: InferRequest, all_names: Iterable[str]) -> set[str]:
    """The outputs to send as binary data: each one's `binary_data`, else `binary_data_output`."""
    if not request.outputs:
        return set(all_names) if request.binary_output else set()
    return {
        output.name
        for output in request.outputs
        if (request.binary_output if output.binary is None else output.binary)
    }


def _json_data(where: str, output: InferOutput) -> Any:
    dtype, count = DATATYPES[parse_datatype(where, output.datatype)], element_count(output.shape)
    if dtype is None:
        try:
            items = [
                item if isinstance(item, str) else as_bytes(where, item).decode()
                for item in flat_items(output.data)
            ]
        except UnicodeDecodeError:
            raise ProtocolError(f"{where}: BYTES not UTF-8; ask for it as binary data") from None
        if len(items) != count:
            raise ProtocolError(f"{where}: {len(items)} elements for shape {output.shape}", 500)
        return items
    array = np.ascontiguousarray(output.data, dtype=dtype.newbyteorder("="))
    if array.size != count:
        raise ProtocolError(f"{where}: {array.size} elements for shape {output.shape}", 500)
    return array.reshape(-1)


def encode_rest_response(response: InferResponse, binary: set[str]) -> tuple[bytes, dict[str, str]]:
    """A REST response body and its headers; the outputs named in `binary` as binary data."""
    tensors, blobs = [], []
    for output in response.outputs:
        where = f"outputs.{output.name}"
        tensor = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        if output.name in binary:
            blob = encode_raw(where, output.datatype, output.shape, output.data)
            tensor["parameters"] = {**output.parameters, "binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            if output.parameters:
                tensor["parameters"] = output.parameters
            tensor["data"] = _json_data(where, output)
        tensors.append(tensor)
    document: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version is not None:
        document["model_version"] = response.model_version
    if response.id is not None:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = response.parameters
    document["outputs"] = tensors
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return b"".join([header, *blobs]), headers


def error_body(message: str) -> bytes:
    """The body of a failed request, as the protocol defines it."""
    return orjson.dumps({"error": message})


def server_metadata(name: str, version: str, extensions: Sequence[str]) -> dict[str, Any]:
    """The REST server metadata response."""
    return {"name": name, "version": version, "extensions": list(extensions)}


def model_metadata(
    name: str,
    versions: Sequence[str],
    platform: str,
    inputs: Sequence[TensorMetadata],
    outputs: Sequence[TensorMetadata],
) -> dict[str, Any]:
    """The REST model metadata response; a shape's -1 is a dimension of any size."""

    def tensors(specs: Sequence[TensorMetadata]) -> list[dict[str, Any]]:
        return [{"name": n, "datatype": d, "shape": list(s)} for n, d, s in specs]

    return {
        "name": name,
        "versions": list(versions),
        "platform": platform,
        "inputs": tensors(inputs),
        "outputs": tensors(outputs),
    }
