"""Values inside MindRecord pages (``mftune.data.mindrecord`` locates them): a row's blob split into
its fields, arrays (MindSpore's integer compression undone), and the msgpack map of a raw page.

From MindSpore 2.7.0's ``ShardColumn`` (shard_column.cc) and ``populate_data`` (mindrecord/shardutils.py):

- A row's blob: with one blob field, that field's bytes; with several, for each field in ``blob_fields``
  order an 8-byte big-endian length and the bytes.
- From version 3.0, when the schema has an int32/int64 array, the int32/int64 blob fields are compressed:
  a big-endian uint32 count, a 2-bit code per element (int8, int16, int32, int64; the first element in a
  byte's high bits), then each element little-endian in its own width.
- Other arrays are little-endian, reshaped to the schema's ``shape``; ``bytes`` fields are bytes.
- A raw page row is msgpack (nlohmann::json::to_msgpack) of the row's scalar fields.
"""
from __future__ import annotations

import struct
from typing import Any

import numpy as np

LENGTH = 8  # bytes of a blob field's length
NUMPY = {"int32": np.int32, "int64": np.int64, "float32": np.float32, "float64": np.float64}


def split_blob(blob: memoryview, blob_fields: list[str]) -> dict[str, memoryview]:
    """A row's blob -> each blob field's bytes (still compressed)."""
    if len(blob_fields) == 1:
        return {blob_fields[0]: blob}
    parts, at = {}, 0
    for field in blob_fields:
        n = int.from_bytes(blob[at:at + LENGTH], "big")
        if at + LENGTH + n > len(blob):
            raise ValueError(f"field {field!r} claims {n} bytes, the blob has {len(blob) - at - LENGTH} left")
        parts[field] = blob[at + LENGTH:at + LENGTH + n]
        at += LENGTH + n
    if at != len(blob):
        raise ValueError(f"{len(blob) - at} bytes follow the last blob field")
    return parts


def decode_field(spec: dict, data: memoryview, compressed: bool) -> np.ndarray | bytes:
    """One blob field's value: an array of the schema's type and shape, or bytes."""
    if "shape" not in spec:
        return bytes(data)  # type "bytes"
    if compressed and spec["type"] in ("int32", "int64"):
        array = uncompress_int(data).astype(NUMPY[spec["type"]])
    else:
        dtype = np.dtype(NUMPY[spec["type"]]).newbyteorder("<")
        if len(data) % dtype.itemsize:
            raise ValueError(f"{len(data)} bytes are not a whole number of {spec['type']} values")
        array = np.frombuffer(data, dtype).astype(NUMPY[spec["type"]])
    return array.reshape(spec["shape"])


_WIDTHS = (np.dtype("<i1"), np.dtype("<i2"), np.dtype("<i4"), np.dtype("<i8"))


def uncompress_int(data: memoryview) -> np.ndarray:
    """MindSpore's ShardColumn::UncompressInt, vectorised: int64 values."""
    n = int.from_bytes(data[:4], "big")
    start = 4 + (n + 3) // 4
    codes = np.frombuffer(data, np.uint8, (n + 3) // 4, 4)
    kinds = ((codes[:, None] >> np.array([6, 4, 2, 0], np.uint8)) & 3).reshape(-1)[:n].astype(np.int64)
    sizes = np.left_shift(1, kinds)
    ends = start + np.cumsum(sizes)
    if (ends[-1] if n else start) != len(data):
        raise ValueError(f"{n} compressed integers take {ends[-1] if n else start} bytes, the field has {len(data)}")
    raw, out = np.frombuffer(data, np.uint8), np.empty(n, np.int64)
    for kind, dtype in enumerate(_WIDTHS):
        at = np.nonzero(kinds == kind)[0]
        if at.size:
            picked = raw[(ends[at] - dtype.itemsize)[:, None] + np.arange(dtype.itemsize)]
            out[at] = np.ascontiguousarray(picked).view(dtype).reshape(-1)
    return out


def scalar(spec: dict, value: Any) -> Any:
    if spec["type"] in NUMPY:
        return NUMPY[spec["type"]](value)
    return value  # string (bytes fields are blobs)


# msgpack, the subset nlohmann::json::to_msgpack writes for a raw page's map of scalars
_FIXED = {0xca: ">f", 0xcb: ">d", 0xcc: ">B", 0xcd: ">H", 0xce: ">I", 0xcf: ">Q",
          0xd0: ">b", 0xd1: ">h", 0xd2: ">i", 0xd3: ">q"}
_SIZED = {0xc4: (1, "bin"), 0xc5: (2, "bin"), 0xc6: (4, "bin"), 0xd9: (1, "str"), 0xda: (2, "str"),
          0xdb: (4, "str"), 0xdc: (2, "array"), 0xdd: (4, "array"), 0xde: (2, "map"), 0xdf: (4, "map")}
_CONSTANTS = {0xc0: None, 0xc2: False, 0xc3: True}


def unpack_msgpack(data: bytes | memoryview) -> Any:
    value, end = _unpack(bytes(data), 0)
    if end != len(data):
        raise ValueError(f"{len(data) - end} bytes follow the msgpack value")
    return value


def _unpack(buf: bytes, at: int) -> tuple[Any, int]:
    code, at = buf[at], at + 1
    if code <= 0x7f or code >= 0xe0:
        return (code if code <= 0x7f else code - 0x100), at
    if code in _CONSTANTS:
        return _CONSTANTS[code], at
    if code in _FIXED:
        return struct.unpack_from(_FIXED[code], buf, at)[0], at + struct.calcsize(_FIXED[code])
    if code in _SIZED:
        width, kind = _SIZED[code]
        n, at = int.from_bytes(buf[at:at + width], "big"), at + width
    elif code <= 0x8f:
        kind, n = "map", code & 0x0f
    elif code <= 0x9f:
        kind, n = "array", code & 0x0f
    elif code <= 0xbf:
        kind, n = "str", code & 0x1f
    else:
        raise ValueError(f"msgpack type 0x{code:02x} is not one MindSpore writes")
    if kind in ("str", "bin"):
        if at + n > len(buf):
            raise ValueError("the msgpack value is cut short")
        return (buf[at:at + n].decode("utf-8") if kind == "str" else buf[at:at + n]), at + n
    items = []
    for _ in range(2 * n if kind == "map" else n):
        item, at = _unpack(buf, at)
        items.append(item)
    return (dict(zip(items[::2], items[1::2])) if kind == "map" else items), at
