"""Tensors of the Open Inference Protocol v2: datatypes, shapes and the raw binary form.

REST's binary tensor data extension and gRPC's `raw_input_contents`/`raw_output_contents` carry a
tensor the same way: its elements row-major and little-endian, BYTES elements each a 4-byte
little-endian length and then the bytes. Both codecs (`protocol`, `grpc_codec`) use this one.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

# Little-endian, as the binary extension and raw gRPC contents are; None: BYTES, length-prefixed.
DATATYPES: dict[str, np.dtype | None] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": None,
}
MAX_DIMS = 32
MAX_DIM = 2**63 - 1  # gRPC shapes are int64
Tensor = np.ndarray | list[bytes]


class ProtocolError(ValueError):
    """A request the protocol rejects: the message names the field, `status` the HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


def element_count(shape: Sequence[int]) -> int:
    """The number of elements of a tensor of `shape`."""
    count = 1
    for dim in shape:
        count *= dim
    return count


def parse_shape(where: str, shape: Any) -> list[int]:
    """A shape as a list of non-negative ints, or a `ProtocolError` naming `where`."""
    if not isinstance(shape, list):
        raise ProtocolError(f"{where}.shape: expected a list of dimensions, got {shape!r:.80}")
    if len(shape) > MAX_DIMS:
        raise ProtocolError(f"{where}.shape: {len(shape)} dimensions, at most {MAX_DIMS}")
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim <= MAX_DIM:
            raise ProtocolError(f"{where}.shape: {dim!r:.40} is not a non-negative integer")
    return list(shape)


def parse_datatype(where: str, datatype: Any) -> str:
    """A v2 datatype name, or a `ProtocolError` listing the ones there are."""
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        known = ", ".join(DATATYPES)
        raise ProtocolError(f"{where}.datatype: {datatype!r:.40} is not one of {known}")
    return datatype


def decode_raw(where: str, datatype: str, shape: list[int], raw: bytes | memoryview) -> Tensor:
    """A tensor from its binary form: row-major little-endian, or length-prefixed BYTES."""
    dtype, count = DATATYPES[datatype], element_count(shape)
    if dtype is None:
        return _split_bytes(where, raw, count)
    if len(raw) != count * dtype.itemsize:
        raise ProtocolError(
            f"{where}: {len(raw)} bytes of data, shape {shape} of {datatype} needs "
            f"{count * dtype.itemsize}"
        )
    if datatype == "BOOL":  # any byte but 0 is true; numpy's bool must be 0 or 1
        return (np.frombuffer(raw, np.uint8) != 0).reshape(shape)
    array = np.frombuffer(raw, dtype).reshape(shape)
    return array if array.flags.aligned else array.copy()  # an odd offset in the body


def _split_bytes(where: str, raw: bytes | memoryview, count: int) -> list[bytes]:
    view, items, offset = memoryview(raw), [], 0
    if count > len(view) // 4:
        raise ProtocolError(f"{where}: {len(view)} bytes cannot hold {count} BYTES elements")
    while offset < len(view) and len(items) < count:
        if offset + 4 > len(view):
            raise ProtocolError(f"{where}: BYTES element {len(items)} has a cut length prefix")
        (size,) = struct.unpack_from("<I", view, offset)
        if offset + 4 + size > len(view):
            raise ProtocolError(f"{where}: BYTES element {len(items)} runs past the data")
        items.append(bytes(view[offset + 4 : offset + 4 + size]))
        offset += 4 + size
    if len(items) != count or offset != len(view):
        raise ProtocolError(
            f"{where}: expected {count} BYTES elements in {len(view)} bytes, "
            f"found {len(items)} in {offset}"
        )
    return items


def encode_raw(where: str, datatype: str, shape: list[int], data: Any) -> bytes:
    """A tensor's binary form: row-major little-endian, or length-prefixed BYTES."""
    dtype, count = DATATYPES[parse_datatype(where, datatype)], element_count(shape)
    if dtype is None:
        items = [as_bytes(where, item) for item in flat_items(data)]
        if len(items) != count:
            raise ProtocolError(f"{where}: {len(items)} elements for shape {shape}", 500)
        return b"".join(struct.pack("<I", len(item)) + item for item in items)
    array = np.asarray(data, dtype=dtype)
    if array.size != count:
        raise ProtocolError(f"{where}: {array.size} elements for shape {shape}", 500)
    return np.ascontiguousarray(array).tobytes()


def flat_items(data: Any) -> list[Any]:
    """The elements of a (nested) list or array, row-major, as Python objects."""
    return np.asarray(data, dtype=object).reshape(-1).tolist()


def as_bytes(where: str, item: Any) -> bytes:
    """A BYTES element as `bytes`; a `str` is UTF-8 encoded."""
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    if isinstance(item, str):
        return item.encode()
    raise ProtocolError(f"{where}: BYTES element of type {type(item).__name__}", 500)
