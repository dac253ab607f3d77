"""The Open Inference Protocol v2 codec against tritonclient, the protocol's standard client.

Request bodies and gRPC messages are built by tritonclient's own encoders and read by ours;
our responses are read back by tritonclient's `InferResult`. Anything malformed is a
`ProtocolError`, never another exception.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

tritonhttp = pytest.importorskip("tritonclient.http")
tritongrpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2 as triton_pb  # noqa: E402
from tritonclient.grpc._utils import _get_inference_request  # noqa: E402
from tritonclient.http._utils import _get_error  # noqa: E402

from mmops.serving.oip import grpc_codec, protocol  # noqa: E402
from mmops.serving.oip import grpc_predict_v2_pb2 as pb  # noqa: E402
from mmops.serving.oip.protocol import (  # noqa: E402
    HEADER_LENGTH,
    InferOutput,
    InferResponse,
    ProtocolError,
    binary_outputs,
    decode_rest_request,
    decompress,
    encode_rest_response,
    error_body,
)

ROOT = Path(__file__).resolve().parents[2]
OIP = ROOT / "mmops" / "serving" / "oip"
PROTO = "mmops/serving/oip/grpc_predict_v2.proto"
MAX = 1 << 20
NUMERIC = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
IMAGES = [b"\x89PNG\r\n\x1a\n\x00\xff", b"", b"\x00" * 300]


def http_input(name: str, array: np.ndarray, datatype: str, binary: bool) -> Any:
    tensor = tritonhttp.InferInput(name, list(array.shape), datatype)
    return tensor.set_data_from_numpy(array, binary_data=binary)


def rest_body(inputs: list, outputs: list | None = None, **kwargs: Any) -> tuple[bytes, int | None]:
    """The body and header length tritonclient's `infer` would send."""
    client = tritonhttp.InferenceServerClient
    return client.generate_request_body(inputs, outputs=outputs, **kwargs)


def decode(body: bytes, header_length: int | str | None = None) -> protocol.InferRequest:
    return decode_rest_request(body, header_length, MAX)


def rejects(body: bytes, header_length: int | str | None, pattern: str, status: int = 400) -> None:
    with pytest.raises(ProtocolError, match=pattern) as caught:
        decode(body, header_length)
    assert caught.value.status == status


def dumps(value: Any) -> bytes:
    """JSON as any client may write it: stdlib json keeps integers past 64 bits, orjson cannot."""
    return json.dumps(value).encode()


def json_request(*inputs: dict, **extra: Any) -> bytes:
    return dumps({"inputs": list(inputs), **extra})


# --- REST requests, built by tritonclient ---


def test_bytes_inputs_sent_as_binary_data_decode_to_the_raw_bytes() -> None:
    array = np.array(IMAGES, dtype=object)
    body, header_length = rest_body([http_input("image", array, "BYTES", binary=True)])
    request = decode(body, header_length)
    image = request.inputs["image"]
    assert (image.datatype, image.shape, image.data) == ("BYTES", [3], IMAGES)
    assert not image.from_json
    assert request.binary_output  # no outputs named: tritonclient asks for all as binary


def test_bytes_inputs_sent_as_json_are_their_strings_utf8_encoded_and_flagged() -> None:
    texts = np.array(["aGVsbG8=", "ünï", ""], dtype=object)
    body, header_length = rest_body([http_input("image", texts, "BYTES", binary=False)])
    assert header_length is None
    image = decode(body).inputs["image"]
    assert image.data == [b"aGVsbG8=", "ünï".encode(), b""]
    assert image.from_json


@pytest.mark.parametrize("datatype", sorted(NUMERIC))
@pytest.mark.parametrize("binary", [True, False])
def test_every_numeric_datatype_decodes_to_its_array(datatype: str, binary: bool) -> None:
    rng = np.random.default_rng(len(datatype))
    array = (rng.random((2, 3)) * 100).astype(NUMERIC[datatype])
    body, header_length = rest_body([http_input("x", array, datatype, binary)])
    decoded = decode(body, header_length).inputs["x"].data
    assert decoded.dtype == np.dtype(NUMERIC[datatype]) and decoded.shape == (2, 3)
    np.testing.assert_array_equal(decoded, array)


def test_inputs_mix_binary_and_json_in_input_order() -> None:
    probs = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    inputs = [
        http_input("pixels", probs, "FP32", binary=True),
        http_input("text", np.array([b"a cat"], dtype=object), "BYTES", binary=False),
        http_input("image", np.array(IMAGES[:2], dtype=object), "BYTES", binary=True),
        http_input("ids", np.array([[1, -2], [3, 4]], dtype=np.int64), "INT64", binary=False),
    ]
    body, header_length = rest_body(inputs, request_id="r-1", parameters={"top_k": 2})
    request = decode(body, str(header_length))
    assert list(request.inputs) == ["pixels", "text", "image", "ids"]
    np.testing.assert_array_equal(request.inputs["pixels"].data, probs)
    assert request.inputs["text"].data == [b"a cat"]
    assert request.inputs["image"].data == IMAGES[:2]
    np.testing.assert_array_equal(request.inputs["ids"].data, [[1, -2], [3, 4]])
    assert request.id == "r-1" and request.parameters["top_k"] == 2


def test_json_data_may_be_nested_or_flat() -> None:
    for data in ([[1, 2, 3], [4, 5, 6]], [1, 2, 3, 4, 5, 6]):
        tensor = {"name": "x", "datatype": "INT32", "shape": [2, 3], "data": data}
        np.testing.assert_array_equal(
            decode(json_request(tensor)).inputs["x"].data, [[1, 2, 3], [4, 5, 6]]
        )


def test_requested_outputs_say_which_come_back_as_binary() -> None:
    x = http_input("x", np.zeros(1, np.float32), "FP32", binary=True)
    outputs = [
        tritonhttp.InferRequestedOutput("probs", binary_data=True),
        tritonhttp.InferRequestedOutput("label", binary_data=False),
    ]
    request = decode(*rest_body([x], outputs))
    assert [(o.name, o.binary) for o in request.outputs] == [("probs", True), ("label", False)]
    assert not request.binary_output
    assert binary_outputs(request, ["probs", "label", "embeds"]) == {"probs"}
    everything = decode(*rest_body([x]))
    assert binary_outputs(everything, ["probs", "label"]) == {"probs", "label"}


def test_binary_outputs_fall_back_to_binary_data_output_then_json() -> None:
    x = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}
    plain = decode(json_request(x))
    assert binary_outputs(plain, ["probs"]) == set()
    asked = decode(
        json_request(
            x,
            outputs=[{"name": "probs"}, {"name": "label", "parameters": {"binary_data": False}}],
            parameters={"binary_data_output": True},
        )
    )
    assert binary_outputs(asked, ["probs", "label"]) == {"probs"}


# --- REST responses, read by tritonclient ---


def response(*outputs: InferOutput) -> InferResponse:
    return InferResponse("clip", "3", "r-1", list(outputs), {"batch": 2})


def triton_result(body: bytes, headers: dict[str, str]) -> Any:
    length = headers.get(HEADER_LENGTH)
    return tritonhttp.InferResult.from_response_body(body, False, length and int(length))


PROBS = np.array([[0.1, 0.9, 0.0], [1 / 3, 2 / 3, 1e-8]], dtype=np.float32)


@pytest.mark.parametrize("binary", [{"probs", "label"}, {"probs"}, {"label"}, set()])
def test_fp32_and_bytes_outputs_read_back_with_tritonclient(binary: set[str]) -> None:
    labels = [b"cat", "dög".encode()]
    body, headers = encode_rest_response(
        response(
            InferOutput("probs", "FP32", [2, 3], PROBS),
            InferOutput("label", "BYTES", [2], labels),
        ),
        binary,
    )
    result = triton_result(body, headers)
    np.testing.assert_array_equal(result.as_numpy("probs"), PROBS)
    assert result.as_numpy("probs").dtype == np.float32
    assert list(result.as_numpy("label")) == (labels if "label" in binary else ["cat", "dög"])
    document = result.get_response()
    assert (document["model_name"], document["model_version"], document["id"]) == (
        "clip",
        "3",
        "r-1",
    )
    assert document["parameters"] == {"batch": 2}
    if binary:
        assert headers["Content-Type"] == "application/octet-stream"
        assert int(headers[HEADER_LENGTH]) < len(body)
    else:
        assert headers == {"Content-Type": "application/json"}


def test_binary_fp32_output_is_little_endian_float32() -> None:
    body, headers = encode_rest_response(
        response(InferOutput("probs", "FP32", [2, 3], PROBS.astype(np.float64))), {"probs"}
    )
    start = int(headers[HEADER_LENGTH])
    assert body[start:] == PROBS.astype("<f4").tobytes()
    header = orjson.loads(body[:start])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 24}


def test_empty_outputs_read_back_as_empty_arrays() -> None:
    for binary in ({"probs"}, set()):
        body, headers = encode_rest_response(
            response(InferOutput("probs", "FP32", [0, 3], np.zeros((0, 3), np.float32))), binary
        )
        assert triton_result(body, headers).as_numpy("probs").shape == (0, 3)


def test_outputs_that_do_not_fit_their_shape_are_server_errors() -> None:
    with pytest.raises(ProtocolError, match=r"outputs\.probs: 6 elements") as caught:
        encode_rest_response(response(InferOutput("probs", "FP32", [4], PROBS)), set())
    assert caught.value.status == 500


def test_non_utf8_bytes_outputs_must_be_asked_for_as_binary() -> None:
    with pytest.raises(ProtocolError, match=r"outputs\.blob: BYTES not UTF-8"):
        encode_rest_response(response(InferOutput("blob", "BYTES", [1], [b"\xff"])), set())


def test_error_body_is_what_tritonclient_reads_as_the_error() -> None:
    class Failed:
        status_code = 400

        def read(self) -> bytes:
            return error_body("inputs.image.shape: [2] needs 2 elements, data has 1")

    error = _get_error(Failed())
    assert error.message() == "inputs.image.shape: [2] needs 2 elements, data has 1"
    assert error.status() == "400"


def test_metadata_responses_follow_the_spec() -> None:
    assert protocol.server_metadata("mmops", "0.1.0", ["binary_tensor_data"]) == {
        "name": "mmops",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data"],
    }
    meta = protocol.model_metadata(
        "clip",
        ["1", "2"],
        "onnxruntime_onnx",
        [("image", "BYTES", (-1,))],
        [("probs", "FP32", [-1, 3])],
    )
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [-1, 3]}]
    assert (meta["versions"], meta["platform"]) == (["1", "2"], "onnxruntime_onnx")


# --- REST errors ---


def image_body(count: int = 2, shape: list[int] | None = None) -> tuple[bytes, int]:
    """A binary BYTES request, its shape optionally overridden in the JSON header."""
    body, header_length = rest_body(
        [http_input("image", np.array(IMAGES[:count], dtype=object), "BYTES", binary=True)]
    )
    if shape is None:
        return body, header_length
    header = orjson.loads(body[:header_length])
    header["inputs"][0]["shape"] = shape
    new = dumps(header)
    return new + body[header_length:], len(new)


def test_a_shape_that_does_not_fit_the_data_names_the_input() -> None:
    tensor = {"name": "image", "datatype": "BYTES", "shape": [3], "data": ["a", "b"]}
    rejects(json_request(tensor), None, r"inputs\.image\.shape: \[3\] needs 3 elements, data has 2")
    rejects(*image_body(2, [3]), r"inputs\.image: .*3 BYTES elements")
    pixels = {
        "name": "pixels",
        "datatype": "FP32",
        "shape": [2, 2],
        "parameters": {"binary_data_size": 12},
    }
    rejects(
        json_request(pixels) + bytes(12), len(json_request(pixels)), r"inputs\.pixels: 12 bytes"
    )


@pytest.mark.parametrize(
    ("shape", "pattern"),
    [
        ([-1], "not a non-negative integer"),
        ([1.5], "not a non-negative integer"),
        ([True], "not a non-negative integer"),
        ("3", "expected a list"),
        ([1] * 33, "at most 32"),
        ([2**64], "not a non-negative integer"),
    ],
)
def test_shapes_must_be_lists_of_non_negative_ints(shape: Any, pattern: str) -> None:
    tensor = {"name": "x", "datatype": "INT8", "shape": shape, "data": [1]}
    rejects(json_request(tensor), None, rf"inputs\.x\.shape: .*{pattern}")


def test_an_unknown_datatype_is_named_with_the_ones_there_are() -> None:
    for datatype in ("FLOAT32", "BF16", 7, None):
        tensor = {"name": "x", "datatype": datatype, "shape": [1], "data": [1]}
        rejects(json_request(tensor), None, r"inputs\.x\.datatype: .* is not one of BOOL, UINT8")


def test_duplicate_input_and_output_names_are_refused() -> None:
    tensor = {"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}
    rejects(json_request(tensor, tensor), None, r"inputs\[1\]\.name: 'x' given twice")
    twice = json_request(tensor, outputs=[{"name": "y"}, {"name": "y"}])
    rejects(twice, None, r"outputs\[1\]\.name: 'y' requested twice")


def test_truncated_binary_data_is_refused() -> None:
    body, header_length = image_body()
    for cut in (1, 5, len(body) - header_length):
        rejects(
            body[:-cut], header_length, r"inputs\.image\.parameters\.binary_data_size: .*run past"
        )


def test_bytes_after_the_binary_data_are_refused() -> None:
    body, header_length = image_body()
    rejects(body + b"\x00", header_length, r"body: 1 bytes after the inputs' binary data")
    tensor = {"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}
    rejects(json_request(tensor) + b"junk", len(json_request(tensor)), "1|4 bytes after")


def test_a_bad_binary_bytes_layout_is_refused() -> None:
    bad = struct.pack("<I", 100) + b"short"
    header = json_request(
        {
            "name": "b",
            "datatype": "BYTES",
            "shape": [1],
            "parameters": {"binary_data_size": len(bad)},
        }
    )
    rejects(header + bad, len(header), r"inputs\.b: .*runs past the data")


@pytest.mark.parametrize("header_length", [0, -1, 10**9, "abc", "", "1e3", "²", 3.5])
def test_a_bad_header_length_is_refused(header_length: Any) -> None:
    body, _ = image_body()
    rejects(body, header_length, HEADER_LENGTH)


def test_binary_data_without_a_header_length_is_refused() -> None:
    body, _ = image_body()
    rejects(body, None, "body: not a JSON object")
    header, header_length = image_body()
    rejects(header[:header_length], None, "run past the 0 bytes of binary data")


@pytest.mark.parametrize(
    ("document", "pattern"),
    [
        ([], "body: expected a JSON object"),
        ({}, "inputs: expected a non-empty list"),
        ({"inputs": []}, "inputs: expected a non-empty list"),
        ({"inputs": [3]}, r"inputs\[0\]: expected an object"),
        ({"inputs": [{"name": ""}]}, r"inputs\[0\]\.name"),
        ({"id": 5, "inputs": [{}]}, "id: expected a string"),
        ({"parameters": [], "inputs": [{}]}, "parameters: expected an object"),
        ({"parameters": {"binary_data_output": 1}, "inputs": [{}]}, "binary_data_output"),
        (
            {"inputs": [{"name": "x", "datatype": "INT8", "shape": [1]}]},
            r"inputs\.x\.data: missing",
        ),
        ({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [300]}]}, "range"),
        ({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [-1]}]}, "range"),
        (
            {"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1.5]}]},
            "not all INT8",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["1"]}]},
            "not all FP32",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}]},
            "not all BOOL",
        ),
        ({"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [None]}]}, "not all"),
        (
            {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [1]}]},
            "must be strings",
        ),
        ({"inputs": [{"name": "x", "datatype": "INT8", "shape": [2], "data": [[1], 2]}]}, "mixes"),
        (
            {"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": 1}]},
            "expected a list",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [[[[[1]]]]] * 1}]},
            None,
        ),
    ],
)
def test_malformed_json_requests_name_the_field(document: Any, pattern: str | None) -> None:
    if pattern is None:  # deep but valid nesting of one element
        assert decode(dumps(document)).inputs["x"].data.tolist() == [1]
        return
    rejects(dumps(document), None, pattern)


def test_json_strings_that_are_not_unicode_are_refused() -> None:
    body = b'{"inputs":[{"name":"x","datatype":"BYTES","shape":[1],"data":["\\ud800"]}]}'
    rejects(body, None, "body: not a JSON object")
    rejects(b'{"inputs":[{"name":"\xff"}]}', None, "body: not a JSON object")


def test_nesting_past_the_limits_is_refused() -> None:
    deep = {"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}
    for _ in range(40):
        deep["data"] = [deep["data"]]
    rejects(json_request(deep), None, "nested deeper than 32")
    rejects(b"[" * 5000 + b"]" * 5000, None, "body: not a JSON object")


def test_shared_memory_is_refused() -> None:
    x = tritonhttp.InferInput("x", [1], "FP32")
    x.set_shared_memory("region", 4)
    rejects(rest_body([x])[0], None, "shared memory")


def test_a_body_over_the_limit_is_413() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_rest_request(b" " * 11, None, 10)
    assert caught.value.status == 413


# --- compressed bodies ---


def test_gzip_and_deflate_bodies_as_tritonclient_compresses_them() -> None:
    body, header_length = image_body()
    assert decompress(gzip.compress(body), "gzip", MAX) == body
    assert decompress(zlib.compress(body), "deflate", MAX) == body  # zlib format, as tritonclient
    assert decompress(body, None, MAX) == decompress(body, "identity", MAX) == body
    two_members = gzip.compress(body[:10]) + gzip.compress(body[10:])
    assert decompress(two_members, "gzip", MAX) == body
    assert (
        decode(decompress(gzip.compress(body), "gzip", MAX), header_length).inputs["image"].data
        == IMAGES[:2]
    )


def test_a_gzip_bomb_stops_at_the_limit() -> None:
    bomb = gzip.compress(bytes(64 << 20), compresslevel=9)  # 64 MiB of zeros in ~64 KiB
    for encoding, payload in (("gzip", bomb), ("deflate", zlib.compress(bytes(64 << 20)))):
        with pytest.raises(ProtocolError, match="inflates past") as caught:
            decompress(payload, encoding, MAX)
        assert caught.value.status == 413
    many = gzip.compress(bytes(MAX // 2)) * 3  # each member small, together too big
    with pytest.raises(ProtocolError, match="inflates past"):
        decompress(many, "gzip", MAX)


@pytest.mark.parametrize(
    ("payload", "encoding", "pattern", "status"),
    [
        (b"{}", "br", "Content-Encoding: 'br' is not supported", 415),
        (b"not gzip", "gzip", "not valid gzip data", 400),
        (gzip.compress(b"{}" * 100)[:-9], "gzip", "ends early", 400),
        (zlib.compress(b"{}") + b"x", "deflate", "after the end", 400),
        (b"x" * (MAX + 1), "gzip", "more than the", 413),
    ],
)
def test_bad_compressed_bodies_are_refused(
    payload: bytes, encoding: str, pattern: str, status: int
) -> None:
    with pytest.raises(ProtocolError, match=pattern) as caught:
        decompress(payload, encoding, MAX)
    assert caught.value.status == status


# --- fuzz: anything but a ProtocolError is a bug ---


def random_json(rng: random.Random, depth: int = 0) -> Any:
    leaves = [None, True, False, 0, -1, 2**63, 2**70, 1.5, -1e300, "", "x", "BYTES", "FP32"]
    kind = rng.random()
    if depth > 4 or kind < 0.4:
        return rng.choice([*leaves, rng.randint(-(2**65), 2**65), rng.random()])
    if kind < 0.7:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["name", "datatype", "shape", "data", "parameters", "binary_data_size", "inputs", "id"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def random_request(rng: random.Random) -> tuple[bytes, int | None]:
    """A request near a valid one: mostly right, with random fields where a server expects
    the right ones."""
    tensors, blob = [], b""
    for index in range(rng.randint(0, 3)):
        shape = rng.choice([[2], [1, 2], [0], [], [rng.randint(-2, 4)], random_json(rng)])
        tensor = {
            "name": rng.choice(["a", "b", f"t{index}", random_json(rng)]),
            "datatype": rng.choice([*NUMERIC, "BYTES", random_json(rng)]),
            "shape": shape,
        }
        if rng.random() < 0.5:
            data = [[1, 2], [[1], [2]], ["a", "b"], [True, False], [0.5, 1], random_json(rng)]
            tensor["data"] = rng.choice(data)
        else:
            size = rng.choice([0, 2, 4, 8, 16, 9])
            tensor["parameters"] = {"binary_data_size": rng.choice([size, -1, random_json(rng)])}
            blob += rng.choice([bytes(size), struct.pack("<II", 0, 0), rng.randbytes(size)])
        tensors.append(tensor)
    document: dict[str, Any] = {"inputs": tensors}
    if rng.random() < 0.3:
        document["outputs"] = rng.choice([[{"name": "y"}], random_json(rng)])
    header = dumps(document)
    length = rng.choice([len(header)] * 4 + [None, len(header) - 1, len(header) + 3])
    return header + blob * (length is not None), length


def test_random_bytes_and_random_json_raise_only_protocol_errors() -> None:
    rng = random.Random(20240611)
    valid, header_length = image_body()
    cases: list[tuple[bytes, Any]] = []
    for _ in range(1500):
        raw = rng.randbytes(rng.randint(0, 64))
        cases.append((raw, rng.choice([None, len(raw), rng.randint(-3, 80)])))
        cases.append((dumps(random_json(rng)), None))
        cases.append(random_request(rng))
        mutated = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        cases.append((bytes(mutated[: rng.randint(0, len(mutated))]), header_length))
    decoded = 0
    for body, length in cases:
        try:
            decode(body, length)
            decoded += 1
        except ProtocolError as error:
            assert error.status in (400, 413) and error.message
        for encoding in ("gzip", "deflate"):
            with contextlib.suppress(ProtocolError):
                decompress(body, encoding, 1 << 16)
    assert decoded > 5  # some near-valid requests do decode: the fuzz reaches past the header


# --- gRPC, with tritonclient's messages ---


def grpc_request(inputs: list, outputs: list | None = None, **kwargs: Any) -> pb.ModelInferRequest:
    """The request tritonclient's gRPC `infer` sends, parsed into our messages from the wire."""
    options = {
        "model_version": "",
        "request_id": "",
        "sequence_id": 0,
        "sequence_start": False,
        "sequence_end": False,
        "priority": 0,
        "timeout": None,
        "parameters": None,
    } | kwargs
    theirs = _get_inference_request(model_name="clip", inputs=inputs, outputs=outputs, **options)
    return pb.ModelInferRequest.FromString(theirs.SerializeToString())


def grpc_input(name: str, array: np.ndarray, datatype: str) -> Any:
    return tritongrpc.InferInput(name, list(array.shape), datatype).set_data_from_numpy(array)


def test_grpc_requests_from_tritonclient_decode_raw_bytes_and_fp32() -> None:
    pixels = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    inputs = [
        grpc_input("image", np.array(IMAGES, dtype=object), "BYTES"),
        grpc_input("pixels", pixels, "FP32"),
    ]
    outputs = [tritongrpc.InferRequestedOutput("probs")]
    msg = grpc_request(
        inputs, outputs, request_id="r-9", priority=3, parameters={"temp": 0.5, "tag": "a"}
    )
    assert len(msg.raw_input_contents) == 2  # tritonclient always sends raw contents
    request = grpc_codec.decode_grpc_request(msg, MAX)
    assert request.inputs["image"].data == IMAGES and not request.inputs["image"].from_json
    np.testing.assert_array_equal(request.inputs["pixels"].data, pixels)
    assert [o.name for o in request.outputs] == ["probs"]
    assert (request.id, request.model_name, request.model_version) == ("r-9", "clip", "")
    assert request.parameters == {"priority": 3, "temp": 0.5, "tag": "a"}


@pytest.mark.parametrize("datatype", sorted(NUMERIC))
def test_every_numeric_datatype_decodes_from_grpc_raw_contents(datatype: str) -> None:
    array = (np.random.default_rng(3).random((3, 2)) * 100).astype(NUMERIC[datatype])
    request = grpc_codec.decode_grpc_request(grpc_request([grpc_input("x", array, datatype)]), MAX)
    np.testing.assert_array_equal(request.inputs["x"].data, array)
    assert request.inputs["x"].data.dtype == np.dtype(NUMERIC[datatype])


def typed_request(datatype: str, shape: list[int], **contents: Any) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=shape)
    tensor.contents.CopyFrom(pb.InferTensorContents(**contents))
    return pb.ModelInferRequest(model_name="clip", inputs=[tensor])


def test_grpc_typed_contents_decode_too() -> None:
    decode_grpc = grpc_codec.decode_grpc_request
    fp32 = decode_grpc(typed_request("FP32", [2, 2], fp32_contents=[1, 2, 3, 4.5]), MAX)
    np.testing.assert_array_equal(fp32.inputs["x"].data, [[1, 2], [3, 4.5]])
    int8 = decode_grpc(typed_request("INT8", [2], int_contents=[-128, 127]), MAX)
    assert int8.inputs["x"].data.dtype == np.int8
    text = decode_grpc(typed_request("BYTES", [2], bytes_contents=[b"a", b"\xff"]), MAX)
    assert text.inputs["x"].data == [b"a", b"\xff"]
    with pytest.raises(ProtocolError, match=r"inputs\.x\.contents\.int_contents: .*range"):
        decode_grpc(typed_request("INT8", [1], int_contents=[200]), MAX)
    with pytest.raises(ProtocolError, match=r"inputs\.x\.contents\.fp32_contents: 1 elements"):
        decode_grpc(typed_request("FP32", [2], fp32_contents=[1]), MAX)
    with pytest.raises(ProtocolError, match="FP16 travels as raw_input_contents only"):
        decode_grpc(typed_request("FP16", [1]), MAX)


def test_bad_grpc_requests_name_the_field() -> None:
    decode_grpc = grpc_codec.decode_grpc_request
    x = grpc_input("x", np.zeros((2, 2), np.float32), "FP32")
    msg = grpc_request([x, grpc_input("x", np.zeros(1, np.float32), "FP32")])
    with pytest.raises(ProtocolError, match=r"inputs\[1\]\.name: 'x' given twice"):
        decode_grpc(msg, MAX)
    msg = grpc_request([x])
    msg.raw_input_contents[0] = msg.raw_input_contents[0][:-1]
    with pytest.raises(ProtocolError, match=r"inputs\.x: 15 bytes of data"):
        decode_grpc(msg, MAX)
    msg.raw_input_contents.append(b"")
    with pytest.raises(ProtocolError, match="raw_input_contents: 2 entries for 1 inputs"):
        decode_grpc(msg, MAX)
    msg = grpc_request([x])
    msg.inputs[0].shape[0] = -1
    with pytest.raises(ProtocolError, match=r"inputs\.x\.shape"):
        decode_grpc(msg, MAX)
    msg.inputs[0].datatype = "FLOAT"
    with pytest.raises(ProtocolError, match=r"inputs\.x\.datatype"):
        decode_grpc(msg, MAX)
    with pytest.raises(ProtocolError) as caught:
        decode_grpc(grpc_request([x]), 10)
    assert caught.value.status == 413
    assert grpc_codec.grpc_status(413).name == "RESOURCE_EXHAUSTED"
    assert grpc_codec.grpc_status(400).name == "INVALID_ARGUMENT"
    assert grpc_codec.grpc_status(404).name == "NOT_FOUND"


def test_grpc_responses_read_back_with_tritonclient() -> None:
    labels = [b"cat", b"\xffdog"]
    ours = grpc_codec.encode_grpc_response(
        response(
            InferOutput("probs", "FP32", [2, 3], PROBS),
            InferOutput("label", "BYTES", [2], labels),
            InferOutput("empty", "INT64", [0], np.zeros(0, np.int64)),
        )
    )
    theirs = triton_pb.ModelInferResponse.FromString(ours.SerializeToString())
    result = tritongrpc.InferResult(theirs)
    np.testing.assert_array_equal(result.as_numpy("probs"), PROBS)
    assert list(result.as_numpy("label")) == labels
    assert result.as_numpy("empty").shape == (0,)
    assert (theirs.model_name, theirs.model_version, theirs.id) == ("clip", "3", "r-1")
    assert theirs.parameters["batch"].int64_param == 2


def test_fuzzed_grpc_requests_raise_only_protocol_errors() -> None:
    rng = random.Random(7)
    for _ in range(1500):
        msg = pb.ModelInferRequest()
        for index in range(rng.randint(0, 3)):
            tensor = msg.inputs.add(
                name=rng.choice(["", "a", f"t{index}"]),
                datatype=rng.choice([*NUMERIC, "BYTES", "BF16", ""]),
                shape=[rng.randint(-1, 3) for _ in range(rng.randint(0, 3))],
            )
            if rng.random() < 0.3:
                tensor.contents.int_contents.extend([rng.randint(-300, 300)] * rng.randint(0, 4))
                tensor.contents.bytes_contents.extend([b"x"] * rng.randint(0, 3))
            if rng.random() < 0.6:
                msg.raw_input_contents.append(rng.randbytes(rng.choice([0, 1, 4, 8, 12, 16])))
        with contextlib.suppress(ProtocolError):
            grpc_codec.decode_grpc_request(msg, MAX)


def test_grpc_parameters_land_in_the_fields_tritonclient_reads() -> None:
    values = {"b": True, "i": -3, "u": 2**63, "f": 0.25, "s": "x", "n": np.int32(7)}
    ours = grpc_codec.encode_grpc_response(InferResponse("clip", None, None, [], values))
    theirs = triton_pb.ModelInferResponse.FromString(ours.SerializeToString()).parameters
    kinds = {key: theirs[key].WhichOneof("parameter_choice") for key in values}
    assert kinds == {
        "b": "bool_param",
        "i": "int64_param",
        "u": "uint64_param",
        "f": "double_param",
        "s": "string_param",
        "n": "int64_param",
    }
    assert {key: grpc_codec.parameter_value(theirs[key]) for key in values} == values
    with pytest.raises(ProtocolError, match="has no InferParameter field"):
        grpc_codec.encode_grpc_response(InferResponse("clip", None, None, [], {"l": [1]}))


def test_grpc_metadata_messages_read_back_with_tritonclient() -> None:
    server = grpc_codec.server_metadata("mmops", "0.1.0", ["binary_tensor_data"])
    theirs = triton_pb.ServerMetadataResponse.FromString(server.SerializeToString())
    assert (theirs.name, theirs.version, list(theirs.extensions)) == (
        "mmops",
        "0.1.0",
        ["binary_tensor_data"],
    )
    model = grpc_codec.model_metadata(
        "clip", ["1"], "onnxruntime_onnx", [("image", "BYTES", [-1])], [("probs", "FP32", [-1, 3])]
    )
    theirs = triton_pb.ModelMetadataResponse.FromString(model.SerializeToString())
    assert (theirs.inputs[0].name, list(theirs.inputs[0].shape)) == ("image", [-1])
    assert (theirs.outputs[0].datatype, list(theirs.outputs[0].shape)) == ("FP32", [-1, 3])


# --- the .proto and its generated code ---


def fields(descriptor: Any) -> dict[str, Any]:
    shape = {f.name: (f.number, f.type, f.is_repeated) for f in descriptor.fields}
    return shape | {n.name: fields(n) for n in descriptor.nested_types}


def test_our_proto_matches_tritonclients_where_they_overlap() -> None:
    ours, theirs = pb.DESCRIPTOR, triton_pb.DESCRIPTOR
    service = ours.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    their_methods = theirs.services_by_name["GRPCInferenceService"].methods_by_name
    for method in service.methods:
        assert method.input_type.full_name == their_methods[method.name].input_type.full_name
        assert method.output_type.full_name == their_methods[method.name].output_type.full_name
    assert {m.name for m in service.methods} == {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"
    }  # fmt: skip
    for name, message in ours.message_types_by_name.items():
        assert fields(message) == fields(theirs.message_types_by_name[name]), name


def generate(out: Path) -> dict[str, str]:
    """What the generated files should hold: protoc's output, given a docstring and a pool.

    The messages go into a descriptor pool of their own: tritonclient's grpc_service.proto
    defines the same `inference.*` names in protobuf's default pool, and a process that
    loads both (a test of the server with tritonclient) would fail with `duplicate symbol`.
    """
    done = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={out}",
         f"--pyi_out={out}", f"--grpc_python_out={out}", PROTO],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    folder = out / "mmops" / "serving" / "oip"
    pb2 = (folder / "grpc_predict_v2_pb2.py").read_text()
    default_pool = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
    assert pb2.count(default_pool) == 1
    pb2 = pb2.replace(
        default_pool,
        "_POOL = _descriptor_pool.DescriptorPool()  # not Default(): tritonclient's names clash\n"
        "DESCRIPTOR = _POOL.AddSerializedFile(",
    )
    stubs = (folder / "grpc_predict_v2_pb2_grpc.py").read_text()
    return {
        "grpc_predict_v2_pb2.py": '"""The Open Inference Protocol v2 gRPC messages '
        '(generated from grpc_predict_v2.proto)."""\n' + pb2,
        "grpc_predict_v2_pb2_grpc.py": '"""The Open Inference Protocol v2 gRPC service stubs '
        '(generated from grpc_predict_v2.proto)."""\n' + stubs,
        "grpc_predict_v2_pb2.pyi": (folder / "grpc_predict_v2_pb2.pyi").read_text(),
    }


def test_generated_code_is_what_protoc_makes_of_the_proto(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed")
    committed_version = re.search(
        r"GRPC_GENERATED_VERSION = '([^']+)'", (OIP / "grpc_predict_v2_pb2_grpc.py").read_text()
    )
    tools_version = importlib.metadata.version("grpcio-tools")
    if (
        committed_version
        and committed_version.group(1) != tools_version
        and not os.environ.get("OIP_REGENERATE")
    ):
        pytest.skip(f"grpcio-tools {tools_version}, the code was made by {committed_version[1]}")
    fresh = generate(tmp_path)
    if os.environ.get("OIP_REGENERATE"):
        for name, text in fresh.items():
            (OIP / name).write_text(text)
    stale = [name for name, text in fresh.items() if (OIP / name).read_text() != text]
    assert not stale, (
        f"{stale} differ from {PROTO}; regenerate: OIP_REGENERATE=1 .venv/bin/python -m pytest "
        "tests/code/test_oip_protocol.py -k generated"
    )
