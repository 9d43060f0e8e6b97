"""MindRecord files (MindSpore's dataset format, what MindFormers' ``llama_preprocess.py`` writes),
read without MindSpore.

The layout, from MindSpore 2.7.0 (``mindspore/ccsrc/minddata/mindrecord``: shard_header, shard_reader,
shard_column) and checked against the files its ``FileWriter`` writes (tests/e2e/test_mindrecord_runs.py):

- A set is one shard ``name.mindrecord`` or several, ``name.mindrecord0`` .. ``name.mindrecordN-1``
  (``FileWriter(name, N)``), each with its SQLite index ``<shard>.db`` beside it.
- A shard starts with a little-endian uint64 ``n`` and ``n`` bytes of JSON, the header: ``header_size``,
  ``page_size``, ``version``, ``schema`` (``[{"schema": {field: {"type", "shape"?}}, "blob_fields": [...]}]``),
  ``shard_addresses`` (every shard's file name, in order) and ``page`` (per page: ``page_id``,
  ``page_type`` BLOB_DATA | RAW_DATA, ``page_type_id``, ``page_size``: the bytes it uses).
- Page ``p`` starts at byte ``header_size + p * page_size``. Blob pages hold the rows' arrays and bytes
  fields, raw pages their scalar fields (a msgpack map); a row's part is an 8-byte little-endian length and
  that many bytes.
- The index's table INDEXES gives per ROW_ID: ROW_GROUP_ID (the blob page whose ``page_type_id`` it is),
  PAGE_OFFSET_BLOB/_END, and PAGE_ID_RAW, PAGE_OFFSET_RAW/_END, offsets within the page. Table SHARD_NAME
  names the shard file it indexes. MindSpore reads the rows in ROW_ID order, shard after shard.
- The values inside pages: ``mftune.data.mindrecord_values``.

Which files: a file means its header's shard list (MindSpore's ``MindDataset(file)``: any one shard
opens the whole set, in header order); a directory means every file under it whose name ends in
``mindrecord`` plus digits, sorted by path (MindFormers' ``_process_mindrecord_data``). Unlike MindSpore,
a shard that a header lists but that is missing is an error, not a silently smaller dataset.
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import struct
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple


from mftune.data.mindrecord_values import decode_field, scalar, split_blob, unpack_msgpack
from mftune.data.preprocess import is_dataset_dir
from mftune.errors import DataError

MINDRECORD_NAME = re.compile(r"mindrecord\d*$")  # MindFormers' pattern for the files of a directory
LENGTH = 8  # bytes of a header length and of a row's length in a page
MAX_HEADER = 1 << 27  # MindSpore's kMaxHeaderSize
ENCRYPTED_TAIL = b"ENCRYPT"  # mindspore.mindrecord.config: an encrypted file ends with it
COMPRESSED_SINCE = "3.0"  # MindSpore compares the header's version string with kVersion
HEADER_KEYS = ("header_size", "page_size", "version", "schema", "shard_addresses")
SAME_IN_EVERY_SHARD = ("header_size", "page_size", "version", "index_fields", "schema")  # as ShardReader::Init
INDEX_QUERY = ("SELECT ROW_ID, ROW_GROUP_ID, PAGE_OFFSET_BLOB, PAGE_OFFSET_BLOB_END, PAGE_ID_RAW, "
               "PAGE_OFFSET_RAW, PAGE_OFFSET_RAW_END FROM INDEXES ORDER BY ROW_ID")


@dataclass(frozen=True)
class Shard:
    path: str
    header: dict

    def pages(self) -> list[dict]:
        return self.header.get("page") or []  # null in a shard without records


@dataclass(frozen=True)
class MindRecordSet:
    """The shards of ``path`` in reading order, with the schema they share."""

    path: str
    shards: tuple[Shard, ...]

    @property
    def schema(self) -> dict[str, dict]:
        return self.shards[0].header["schema"][0]["schema"]

    @property
    def blob_fields(self) -> list[str]:
        return list(self.shards[0].header["schema"][0].get("blob_fields") or [])

    @property
    def compressed(self) -> bool:
        """ShardColumn's has_compress_blob_: version >= 3.0 and an int32/int64 array in the schema."""
        return (str(self.shards[0].header["version"]) >= COMPRESSED_SINCE and
                any(s["type"] in ("int32", "int64") and "shape" in s for s in self.schema.values()))

    def rows(self, columns: list[str] | None = None) -> Iterator[Row]:
        """Every record of every shard, in MindSpore's order, with ``columns`` (default: all fields)."""
        columns = list(self.schema) if columns is None else list(columns)
        missing = [c for c in columns if c not in self.schema]
        if missing:
            raise DataError(f"{self.shards[0].path}: the MindRecord schema has no field {missing[0]!r} "
                            f"(it has {sorted(self.schema)}).")
        for shard in self.shards:
            yield from _shard_rows(self, shard, columns)


class Row(NamedTuple):
    shard: str  # the shard file
    index: int  # ROW_ID within the shard
    fields: dict[str, Any]  # arrays as numpy, bytes as bytes, scalars as numpy scalars or str


# ----------------------------------------------------------------------------- which files


def is_mindrecord_dir(path: str) -> bool:
    """A directory holding MindRecord shards (by name) and not a ``datasets`` directory."""
    return os.path.isdir(path) and not is_dataset_dir(path) and bool(_directory_files(path))


def _directory_files(path: str) -> list[str]:
    """MindFormers' rule: every file under ``path`` whose name ends in mindrecord + digits, sorted."""
    found = [os.path.join(r, f) for r, _, files in os.walk(path) for f in files if MINDRECORD_NAME.search(f)]
    return sorted(found)


def open_mindrecord(path: str) -> MindRecordSet:
    """The set ``path`` names (a shard file or a directory), checked: every shard present, a MindRecord
    header in each, one schema."""
    if os.path.isdir(path):
        files = _directory_files(path)
        if not files:
            raise DataError(f"{path} holds no MindRecord file (a name ending in .mindrecord or .mindrecordN).")
    else:
        first = read_header(path)
        files = [os.path.join(os.path.dirname(path), os.path.basename(a)) for a in first["shard_addresses"]]
    shards = []
    for file in files:
        if not os.path.isfile(file):
            raise DataError(f"{file} is missing: it is a shard of the MindRecord set {path} (its header lists "
                            f"{len(files)} shards). Copy every shard and its .db next to the others.")
        shards.append(Shard(file, read_header(file)))
    for shard in shards:
        _check_complete(shard)
        for key in SAME_IN_EVERY_SHARD:
            if shard.header.get(key) != shards[0].header.get(key):
                raise DataError(f"{shard.path} and {shards[0].path} are not shards of one MindRecord set: their "
                                f"'{key}' differs. Put one set per directory, or pass one shard file.")
    return MindRecordSet(path, tuple(shards))


def _check_complete(shard: Shard) -> None:
    folder = os.path.dirname(shard.path)
    for address in shard.header["shard_addresses"]:
        sibling = os.path.join(folder, os.path.basename(address))
        if not os.path.isfile(sibling):
            raise DataError(f"{sibling} is missing: {shard.path}'s header lists it as a shard of its set "
                            f"{shard.header['shard_addresses']}. Copy every shard and its .db together.")
    _index_file(shard)


def _index_file(shard: Shard) -> str:
    """``<shard>.db``, or a DataError saying it is missing (checked when the set is opened, before anything
    reads it)."""
    db = shard.path + ".db"
    if not os.path.isfile(db):
        raise DataError(f"{db} is missing: it is the index of the MindRecord shard {shard.path}, written beside "
                        f"it by FileWriter.commit(). Copy each shard's .db with it.")
    return db


# ----------------------------------------------------------------------------- header


def read_header(path: str) -> dict:
    """The JSON header of one shard; DataError saying what the file is when it is not MindRecord."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(LENGTH)
        n = int.from_bytes(head, "little") if len(head) == LENGTH else 0
        text = f.read(n) if 0 < n <= min(MAX_HEADER, size - LENGTH) else b""
        f.seek(max(0, size - len(ENCRYPTED_TAIL)))
        tail = f.read()
    if tail == ENCRYPTED_TAIL:
        raise DataError(f"{path} is an encrypted MindRecord file (mindspore.mindrecord.set_enc_key). Decrypt it "
                        f"with MindSpore first: mftune reads plain MindRecord files only.")
    try:
        header = json.loads(text) if text else None
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict) or any(k not in header for k in HEADER_KEYS):
        raise DataError(f"{path} is not a MindRecord file: it is {describe_file(path)}. Pass a .mindrecord file "
                        f"written by MindSpore's FileWriter (MindFormers' llama_preprocess.py), a directory of "
                        f"them, a dataset directory written by scripts/llama_preprocess.py, or a raw "
                        f".json / .jsonl / .parquet file.")
    why = _header_problem(header)
    if why:
        raise DataError(f"{path}: the MindRecord header is damaged ({why}). Write the set again with MindSpore's "
                        f"FileWriter.")
    return header


FIELD_TYPES = ("int32", "int64", "float32", "float64", "string", "bytes")
PAGE_KEYS = ("page_id", "page_type", "page_type_id", "page_size")


def _header_problem(header: dict) -> str | None:
    """What in a parsed header the reader could not use, or None."""
    schemas = header["schema"]
    if not (isinstance(schemas, list) and len(schemas) == 1 and isinstance(schemas[0], dict)
            and isinstance(schemas[0].get("schema"), dict)):
        return "it must hold exactly one schema, as MindSpore writes"
    for field, spec in schemas[0]["schema"].items():
        if not isinstance(spec, dict) or spec.get("type") not in FIELD_TYPES:
            return f"field {field!r} has type {spec!r}; MindRecord types are {list(FIELD_TYPES)}"
    if not all(isinstance(header[k], int) and header[k] > 0 for k in ("header_size", "page_size")):
        return f"header_size={header['header_size']!r}, page_size={header['page_size']!r}"
    pages = header.get("page") or []
    if not isinstance(pages, list) or not all(isinstance(p, dict) and all(k in p for k in PAGE_KEYS) for p in pages):
        return f"its page list lacks one of {list(PAGE_KEYS)}"
    if not isinstance(header["shard_addresses"], list) or not header["shard_addresses"]:
        return "it lists no shard"
    return None


SIGNATURES = ((b"SQLite format 3\0", "a SQLite database (a MindRecord index .db? pass the data file beside it)"),
              (b"ARROW1", "an Arrow file (pass the dataset directory holding it)"),
              (b"PK\x03\x04", "a zip archive (a torch checkpoint?)"), (b"\x80", "a Python pickle"),
              (b"\x1f\x8b", "a gzip file"), (b"PAR1", "a parquet file without the .parquet suffix"))


def describe_file(path: str) -> str:
    """What a file looks like from its first bytes, for error messages."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "empty"
    for magic, what in SIGNATURES:
        if head.startswith(magic):
            return what
    n = int.from_bytes(head[:LENGTH], "little") if len(head) >= LENGTH else 0
    if 0 < n < MAX_HEADER and head[LENGTH:LENGTH + 1] == b"{":
        return f"damaged: its header claims {n} bytes of JSON that do not parse or lack {list(HEADER_KEYS)}"
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON text (a raw data file needs the .json or .jsonl suffix)"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return f"binary data starting {head[:8].hex(' ')}"


# ----------------------------------------------------------------------------- index and pages


def read_index(shard: Shard) -> list[tuple[int, ...]]:
    """The rows of ``<shard>.db``: (ROW_ID, ROW_GROUP_ID, blob start, blob end, raw page, raw start, raw end)."""
    db = _index_file(shard)
    try:
        conn = sqlite3.connect(f"file:{urllib.request.pathname2url(os.path.abspath(db))}?mode=ro", uri=True)
        try:
            names = conn.execute("SELECT NAME FROM SHARD_NAME").fetchall()
            rows = conn.execute(INDEX_QUERY).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise DataError(f"{db} is not a MindRecord index ({e}): it is {describe_file(db)}. "
                        f"Write the set again with MindSpore's FileWriter.") from None
    name = os.path.basename(shard.path)
    if not names or names[0][0] != name:
        raise DataError(f"{db} indexes the shard {names[0][0] if names else None!r}, not {name!r}: a shard or its "
                        f".db was renamed. Restore the names FileWriter gave them.")
    return rows


class _Pages:
    """Pages of one open shard, read whole; the last blob page and the last raw page are kept, as
    consecutive rows share them."""

    def __init__(self, f, shard: Shard):
        self.f, self.shard = f, shard
        self.kept: dict[str, tuple[int, bytes]] = {}  # page type -> (page id, bytes)
        self.by_id = {p["page_id"]: p for p in shard.pages()}
        self.blob_of_group = {p["page_type_id"]: p["page_id"] for p in shard.pages() if p["page_type"] == "BLOB_DATA"}

    def page(self, page_id: int) -> bytes:
        if page_id not in self.by_id:
            raise ValueError(f"page {page_id} is not in the header")
        kind = self.by_id[page_id]["page_type"]
        if self.kept.get(kind, (None,))[0] != page_id:
            header = self.shard.header
            offset, used = header["header_size"] + page_id * header["page_size"], self.by_id[page_id]["page_size"]
            self.f.seek(offset)
            data = self.f.read(used)
            if len(data) != used:
                raise ValueError(f"the file ends inside page {page_id} (bytes {offset}..{offset + used}); "
                                 f"it is truncated")
            self.kept[kind] = (page_id, data)
        return self.kept[kind][1]

    def row(self, page_id: int, start: int, end: int) -> memoryview:
        data = self.page(page_id)
        if not 0 <= start <= end - LENGTH <= len(data) - LENGTH:
            raise ValueError(f"bytes {start}..{end} are outside page {page_id} ({len(data)} bytes used)")
        if int.from_bytes(data[start:start + LENGTH], "little") != end - start - LENGTH:
            raise ValueError(f"the length at byte {start} of page {page_id} disagrees with the index")
        return memoryview(data)[start + LENGTH:end]


def _shard_rows(mr: MindRecordSet, shard: Shard, columns: list[str]) -> Iterator[Row]:
    blob_fields = mr.blob_fields
    blob_columns = [c for c in columns if c in blob_fields]
    raw_columns = [c for c in columns if c not in blob_fields]
    index = read_index(shard)
    with open(shard.path, "rb") as f:
        pages = _Pages(f, shard)
        for row_id, group, b0, b1, raw_page, r0, r1 in index:
            try:
                fields = {}
                if blob_columns:
                    if group not in pages.blob_of_group:
                        raise ValueError(f"row group {group} has no blob page in the header")
                    parts = split_blob(pages.row(pages.blob_of_group[group], b0, b1), blob_fields)
                    fields.update({c: decode_field(mr.schema[c], parts[c], mr.compressed) for c in blob_columns})
                if raw_columns:
                    raw = unpack_msgpack(pages.row(raw_page, r0, r1))
                    fields.update({c: scalar(mr.schema[c], raw[c]) for c in raw_columns})
            except (ValueError, KeyError, IndexError, TypeError, struct.error) as e:
                raise DataError(f"{shard.path}: row {row_id} cannot be read ({type(e).__name__}: {e}). The file is "
                                f"damaged or not written by MindSpore's FileWriter: write it again.") from None
            yield Row(shard.path, row_id, fields)
