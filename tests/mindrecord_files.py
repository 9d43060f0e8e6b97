"""A small MindRecord writer for tests: the bytes MindSpore's FileWriter writes (header, blob and raw
pages, compressed integers, the .db index), without MindSpore. tests/e2e/test_mindrecord_runs.py checks
that MindSpore's own reader reads these files as written, so the unit tests' fixtures are real
MindRecord files."""
from __future__ import annotations

import json
import os
import sqlite3
import struct

import numpy as np

INDEX_TABLE = ("CREATE TABLE INDEXES(  ROW_ID               INT  NOT NULL, PAGE_ID_RAW          INT  NOT NULL, "
               "PAGE_OFFSET_RAW      INT  NOT NULL, PAGE_OFFSET_RAW_END  INT  NOT NULL, ROW_GROUP_ID         INT  "
               "NOT NULL, PAGE_ID_BLOB         INT  NOT NULL, PAGE_OFFSET_BLOB     INT  NOT NULL, "
               "PAGE_OFFSET_BLOB_END INT  NOT NULL, PRIMARY KEY(ROW_ID))")
WIKI_SCHEMA = {"input_ids": {"type": "int32", "shape": [-1]}}
QA_SCHEMA = {"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}}


def write_mindrecord(file_name: str, records: list[dict], schema: dict, shard_num: int = 1, *,
                     version: str = "3.0", page_size: int = 1 << 15, header_size: int = 1 << 14) -> list[str]:
    """``FileWriter(file_name, shard_num)`` + ``add_schema(schema)`` + ``write_raw_data(records)`` +
    ``commit()``: records split in order over the shards (shard 0 first). Returns the shard paths."""
    names = [file_name] if shard_num == 1 else [f"{file_name}{i}" for i in range(shard_num)]
    bounds = np.linspace(0, len(records), shard_num + 1).astype(int)
    for shard_id, path in enumerate(names):
        part = records[bounds[shard_id]:bounds[shard_id + 1]]
        _write_shard(path, shard_id, [os.path.basename(n) for n in names], part, schema, version, page_size,
                     header_size)
    return names


def _write_shard(path, shard_id, addresses, records, schema, version, page_size, header_size):
    blob_fields = sorted(k for k, v in schema.items() if "shape" in v or v["type"] == "bytes")
    compress = version >= "3.0" and any(v["type"] in ("int32", "int64") and "shape" in v for v in schema.values())
    blobs = [encode_blob(r, schema, blob_fields, compress) for r in records]
    raws = [pack({k: r[k] for k in schema if k not in blob_fields} or {"id": 0}) for r in records]
    pages, index = [], [[i] for i in range(len(records))]
    for kind, items in (("BLOB_DATA", blobs), ("RAW_DATA", raws)):
        for type_id, (first, data, offsets) in enumerate(_fill_pages(items, page_size)):
            pages.append({"end_row_id": first + len(offsets) if kind == "BLOB_DATA" else 0, "page_id": len(pages),
                          "page_size": len(data), "page_type": kind, "page_type_id": type_id,
                          "row_group_ids": [{"id": 0, "offset": 0}], "shard_id": shard_id,
                          "start_row_id": first if kind == "BLOB_DATA" else 0, "data": data})
            for row, (start, end) in enumerate(offsets, start=first):
                group = [type_id] if kind == "BLOB_DATA" else []
                index[row] += group + [len(pages) - 1, start, end]
    listed = [{k: v for k, v in p.items() if k != "data"} for p in pages]
    header = {"header_size": header_size, "index_fields": None, "page": listed or None,
              "page_size": page_size, "compression_size": 0,
              "schema": [{"blob_fields": blob_fields, "desc": "test", "schema": schema}],
              "shard_addresses": addresses, "shard_id": shard_id, "statistics": None, "version": version}
    text = json.dumps(header, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for p in pages:
            f.seek(header_size + p["page_id"] * page_size)
            f.write(p["data"])
    _write_index(path, index)


def _fill_pages(items: list[bytes], page_size: int):
    """(first row, page bytes, [(start, end)] per row): each item is an 8-byte length + bytes."""
    pages, first, data, offsets = [], 0, b"", []
    for row, item in enumerate(items):
        part = len(item).to_bytes(8, "little") + item
        if data and len(data) + len(part) > page_size:
            pages.append((first, data, offsets))
            first, data, offsets = row, b"", []
        offsets.append((len(data), len(data) + len(part)))
        data += part
    if data:
        pages.append((first, data, offsets))
    return pages


def _write_index(path: str, index: list[list[int]]) -> None:
    db = path + ".db"
    if os.path.exists(db):
        os.remove(db)
    conn = sqlite3.connect(db)
    conn.execute(INDEX_TABLE)
    conn.execute("CREATE TABLE SHARD_NAME(NAME TEXT NOT NULL)")
    conn.execute("INSERT INTO SHARD_NAME VALUES (?)", (os.path.basename(path),))
    conn.executemany("INSERT INTO INDEXES (ROW_ID, ROW_GROUP_ID, PAGE_ID_BLOB, PAGE_OFFSET_BLOB, PAGE_OFFSET_BLOB_END, "
                     "PAGE_ID_RAW, PAGE_OFFSET_RAW, PAGE_OFFSET_RAW_END) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", index)
    conn.commit()
    conn.close()


def encode_blob(record: dict, schema: dict, blob_fields: list[str], compress: bool) -> bytes:
    parts = []
    for field in blob_fields:
        spec, value = schema[field], record[field]
        if spec["type"] == "bytes":
            data = bytes(value)
        elif compress and spec["type"] in ("int32", "int64"):
            data = compress_int(np.asarray(value).ravel())
        else:
            data = np.asarray(value, dtype=np.dtype(spec["type"]).newbyteorder("<")).tobytes()
        parts.append(data if len(blob_fields) == 1 else len(data).to_bytes(8, "big") + data)
    return b"".join(parts)


def compress_int(values: np.ndarray) -> bytes:
    """ShardColumn::CompressInt: count (big-endian uint32), 2-bit width codes, little-endian values."""
    codes = bytearray((len(values) + 3) // 4)
    data = b""
    for i, v in enumerate(int(x) for x in values):
        kind = next(k for k, bits in enumerate((8, 16, 32, 64)) if -(1 << (bits - 1)) <= v < 1 << (bits - 1))
        codes[i // 4] |= kind << (2 * (3 - i % 4))
        data += v.to_bytes(1 << kind, "little", signed=True)
    return len(values).to_bytes(4, "big") + bytes(codes) + data


def pack(value) -> bytes:
    """msgpack (the types nlohmann::json::to_msgpack writes for scalars)."""
    if isinstance(value, dict):
        return bytes([0x80 | len(value)]) + b"".join(pack(k) + pack(v) for k, v in value.items())
    if isinstance(value, str):
        data = value.encode()
        return (bytes([0xa0 | len(data)]) if len(data) < 32 else bytes([0xd9, len(data)])) + data
    if isinstance(value, (float, np.floating)):
        return b"\xcb" + struct.pack(">d", float(value))
    value = int(value)
    if 0 <= value < 128 or -32 <= value < 0:
        return struct.pack(">b" if value < 0 else ">B", value)
    return b"\xd3" + struct.pack(">q", value)
