"""Safetensors files at the byte level: the one header parser, block reads, and the writers.

A safetensors file is an 8-byte little-endian header length, a JSON header (``__metadata__``:
str -> str, then per tensor its dtype, shape and ``data_offsets`` into the data section), then the
raw bytes. mftune's header metadata keys start with ``mftune_`` and hold JSON (``read_metadata``).

Invariants: the header is parsed and checked once per file version (path, size, mtime) and cached;
reads use ``os.preadv`` on exactly the bytes of the block asked for (no memory map, so nothing of
the file stays mapped); writes are atomic (``mftune.fileio``). Every tensor written carries checksums
of its bytes in the header, hashed from memory as it is written, and a read checks the chunks it
touches against them (``mftune.checkpoint.checksum``); files without them read unchecked.
"""
from __future__ import annotations

import functools
import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from mftune.checkpoint.checksum import (KEY, RangeCheck, TensorSums, check_column_block, decode, encode,
                                        hash_chunks, placeholder, verify_enabled)
from mftune.errors import CheckpointError
from mftune.fileio import atomic_open

Block = tuple[slice, ...]  # one slice per dimension of a global tensor
Spec = tuple[str, torch.dtype, tuple[int, ...]]  # (name, dtype, shape) of a tensor to write
ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL"}
FROM_ST = {v: k for k, v in ST_DTYPES.items()}
READ_CHUNK = 64 * 2**20  # bytes read at a time when only some columns of the rows are wanted
METADATA_PREFIX = "mftune_"  # header metadata keys mftune writes (JSON values)


# ----------------------------------------------------------------------------------------------
# header
# ----------------------------------------------------------------------------------------------

def safetensors_header(path: str) -> tuple[int, dict, dict]:
    """(offset of the data section, ``{name: {dtype, shape, data_offsets}}``, metadata) of a
    safetensors file, parsed and checked once per file version (path, size, mtime)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} does not exist. Check load_checkpoint.")
    stat = os.stat(path)
    return _parse_header(path, stat.st_size, stat.st_mtime_ns)


def raw_header(path: str) -> bytes:
    """The header's bytes as stored (names, shapes, offsets, metadata), not parsed or checked: what
    ``mftune.checkpoint.load.fingerprint`` hashes, for any file, damaged ones included (a leftover
    partial file in a checkpoint folder changes the fingerprint instead of failing it)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
        return f.read(n)


@functools.lru_cache(maxsize=256)
def _parse_header(path: str, size: int, mtime_ns: int) -> tuple[int, dict, dict]:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} is beyond the end of the file ({size} bytes)")
            header = json.loads(f.read(n))
        metadata = header.pop("__metadata__", None) or {}
        for key, info in header.items():
            begin, end = info["data_offsets"]
            if info["dtype"] not in FROM_ST or 8 + n + end > size or end - begin != math.prod(
                    info["shape"]) * FROM_ST[info["dtype"]].itemsize:
                raise ValueError(f"tensor {key}: {info}")
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({type(exc).__name__}: "
                              f"{exc}); it may be truncated or foreign. mftune reads .safetensors files "
                              f"(checkpoints, Hugging Face weights).") from None
    return 8 + n, header, metadata


def tensor_specs(path: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of a file, in data order, without reading tensor data."""
    entries = sorted(safetensors_header(path)[1].items(), key=lambda kv: kv[1]["data_offsets"][0])
    return {k: (FROM_ST[v["dtype"]], tuple(v["shape"])) for k, v in entries}


def read_metadata(path: str) -> dict[str, Any]:
    """The ``mftune_*`` header entries of a file, JSON-decoded, without the prefix (the checksums left out: a
    writer that copies these entries into another file must not carry them)."""
    out = {}
    for key, value in safetensors_header(path)[2].items():
        if key.startswith(METADATA_PREFIX) and key != KEY:  # the checksums belong to this file's bytes only
            try:
                out[key[len(METADATA_PREFIX):]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[len(METADATA_PREFIX):]] = value
    return out


def encode_metadata(entries: dict[str, Any]) -> dict[str, str]:
    """``{"format": "pt", "mftune_<key>": JSON}``: the header metadata of a file mftune writes."""
    return {"format": "pt", **{f"{METADATA_PREFIX}{k}": json.dumps(v, default=str) for k, v in entries.items()}}


def file_checksums(path: str) -> tuple[int, dict[str, str]]:
    """(chunk size, ``{tensor name: hex hashes}``) of a file; ``{}`` for a file written without checksums.
    A checksum record that does not fit the file's tensors is an error (its header is damaged)."""
    stat = os.stat(path)
    return _checksums(path, stat.st_size, stat.st_mtime_ns)


def checksummed(path: str) -> bool:
    """Whether every tensor of the (readable) file ``path`` carries checksums."""
    return KEY in safetensors_header(path)[2] and file_checksums(path)[1].keys() == safetensors_header(path)[1].keys()


@functools.lru_cache(maxsize=256)
def _checksums(path: str, size: int, mtime_ns: int) -> tuple[int, dict[str, str]]:
    _, header, metadata = _parse_header(path, size, mtime_ns)
    if KEY not in metadata:
        return 0, {}
    return decode(metadata[KEY], {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}, path)


def _tensor_sums(path: str, key: str, offset: int, nbytes: int) -> TensorSums | None:
    """What to check the bytes of tensor ``key`` (at file ``offset``) against; None: nothing (no checksums, or
    MFTUNE_VERIFY_CHECKSUMS=0)."""
    if not verify_enabled():
        return None
    chunk, sums = file_checksums(path)
    return TensorSums(path, key, sums[key], nbytes, offset, chunk) if key in sums else None


def verify_tensors(path: str) -> bool:
    """Read every tensor of ``path`` (one at a time), checking its bytes against the file's checksums; False
    (nothing read) when the file carries none. A mismatch is a CheckpointError naming tensor and bytes."""
    if not file_checksums(path)[1]:
        return False
    for key in safetensors_header(path)[1]:
        read_tensor(path, key)
    return True


# ----------------------------------------------------------------------------------------------
# reads
# ----------------------------------------------------------------------------------------------

def read_tensor(path: str, key: str) -> torch.Tensor:
    """The whole tensor ``key`` of a safetensors file (``read_block``)."""
    return read_block(path, key, tuple(slice(None) for _ in safetensors_header(path)[1][key]["shape"]))


def load_tensors(path: str, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Read tensors (all, or ``names``) one at a time from a safetensors file."""
    keys = list(safetensors_header(path)[1]) if names is None else names
    return {k: read_tensor(path, k) for k in keys}


def read_block(path: str, key: str, block: Block, out: torch.Tensor | None = None) -> torch.Tensor:
    """``block`` of tensor ``key``: its byte ranges read from the file (a row range in one read; a
    column range of a matrix with one read per row; other blocks of 3+-D tensors through whole rows,
    a chunk at a time). ``out``: a contiguous tensor of the block's shape and the file's dtype to
    read into (e.g. a parameter's local shard: no temporary copy). The chunks read are checked
    against the file's checksums, if it has them (a column block: the chunks it owns, ``checksum``)."""
    start, header, _ = safetensors_header(path)
    info = header[key]
    dtype, shape = FROM_ST[info["dtype"]], info["shape"]
    begin = start + info["data_offsets"][0]
    ranges = [(s.start or 0, shape[d] if s.stop is None else s.stop) for d, s in enumerate(block)]
    want = [hi - lo for lo, hi in ranges]
    if out is None:
        out = torch.empty(want, dtype=dtype)
    elif list(out.shape) != want or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"read_block into {tuple(out.shape)} {out.dtype}: {key} block is {want} {dtype}")
    sums = _tensor_sums(path, key, begin, info["data_offsets"][1] - info["data_offsets"][0])
    if not shape:  # a scalar
        return _pread_checked(path, begin, out, sums, 0)
    if out.numel() == 0:
        return out
    row = math.prod(shape[1:]) * dtype.itemsize
    (lo, hi), rest = ranges[0], block[1:]
    if all(r == (0, n) for r, n in zip(ranges[1:], shape[1:])):  # whole rows: straight into out
        return _pread_checked(path, begin + lo * row, out, sums, lo * row)
    if len(shape) == 2:  # a column range (row-parallel weights): one read of just those bytes per row
        _read_columns(path, key, begin + lo * row, row, ranges[1], out)
        if sums is not None:
            check_column_block(sums, ranges[0], ranges[1], shape[1], row)
        return out
    check = RangeCheck(sums, lo * row) if sums is not None else None
    step = max(1, READ_CHUNK // max(row, 1))
    for r in range(lo, hi, step):
        rows = _pread(path, begin + r * row, torch.empty([min(step, hi - r), *shape[1:]], dtype=dtype), check)
        out[r - lo:r - lo + len(rows)] = rows[(slice(None), *rest)]
    if check is not None:
        check.finish()
    return out


def _read_columns(path: str, key: str, offset: int, row: int, cols: tuple[int, int], out: torch.Tensor) -> None:
    """Columns [c0, c1) of the matrix rows from file ``offset`` (``row`` bytes each) into ``out``, one read per row."""
    width, item = out.shape[1] * out.element_size(), out.element_size()
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    with open(path, "rb", buffering=0) as f:
        for i in range(out.shape[0]):
            if os.preadv(f.fileno(), [view[i * width:(i + 1) * width]], offset + i * row + cols[0] * item) != width:
                raise CheckpointError(f"checkpoint {path} ends before the data of {key}: it is truncated.")


def _pread_checked(path: str, offset: int, out: torch.Tensor, sums: TensorSums | None, at: int) -> torch.Tensor:
    """``_pread`` of bytes that start at byte ``at`` of the tensor ``sums`` describes, every chunk touched checked."""
    check = RangeCheck(sums, at) if sums is not None else None
    _pread(path, offset, out, check)
    if check is not None:
        check.finish()
    return out


def _pread(path: str, offset: int, out: torch.Tensor, check: RangeCheck | None = None) -> torch.Tensor:
    """Fill the contiguous tensor ``out`` with the bytes of ``path`` from ``offset``; with ``check``, a
    chunk at a time, each hashed right after its read, from the CPU's cache (cheaper than 8 MiB pieces
    or one read then one pass: docs/performance.md "Checksums")."""
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < len(view):
            piece = len(view) if check is None else check.sums.chunk - check.pos % check.sums.chunk  # to a chunk's end
            n = os.preadv(f.fileno(), [view[done:done + piece]], offset + done)
            if n <= 0:
                raise CheckpointError(f"checkpoint {path} ends before the data of a tensor: it is truncated.")
            if check is not None:
                check.feed(view[done:done + n])
            done += n
    return out


# ----------------------------------------------------------------------------------------------
# writes
# ----------------------------------------------------------------------------------------------

def save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write ``tensors`` (all in memory) to ``path`` atomically, with their checksums (hashed from memory)."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # our own header (not safetensors' save_file, whose Rust map orders the metadata keys differently in every
    # process): the same tensors give the same bytes
    write_safetensors_streaming(path, [(k, v.dtype, tuple(v.shape)) for k, v in contiguous.items()],
                                contiguous.items(), metadata)


def write_safetensors_streaming(path: str, specs: Sequence[Spec], tensors: Iterable[tuple[str, torch.Tensor]],
                                metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file whose header is built from ``specs`` before any tensor is read.

    ``tensors`` yields ``(name, tensor)`` in ``specs`` order (e.g. a generator reading one at a time),
    each checked against its spec and hashed as it is written; the header is padded with spaces to a
    multiple of 8, written first with placeholder checksums of the final length and rewritten in place
    at the end. Peak memory is one tensor. Atomic. Returns the number of data bytes.
    """
    entries: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in specs:
        if name in entries or name == "__metadata__" or dtype not in ST_DTYPES:
            raise CheckpointError(f"tensor {name} ({dtype}) cannot be written to {path}: duplicate name or dtype.")
        end = offset + math.prod(shape) * dtype.itemsize
        entries[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    metadata = dict(metadata or {})
    first = _header_bytes(metadata, entries, placeholder((k, v["data_offsets"][1] - v["data_offsets"][0])
                                                         for k, v in entries.items()))
    sums: dict[str, str] = {}
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(first)) + first)
        for name, tensor in checked_stream(path, specs, tensors):
            data = tensor_bytes(tensor)
            sums[name] = hash_chunks(data)
            f.write(data)
            del tensor, data  # not held while the next one is read: peak ~ one tensor
        final = _header_bytes(metadata, entries, sums)
        if len(final) != len(first):
            raise RuntimeError(f"writing {path}: the checksum header changed length ({len(first)} -> {len(final)})")
        f.seek(8)
        f.write(final)
    return offset


def _header_bytes(metadata: dict[str, str], entries: dict[str, Any], sums: dict[str, str]) -> bytes:
    raw = json.dumps({"__metadata__": {**metadata, KEY: encode(sums)}, **entries}, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (on the CPU, contiguous), as both writers store them."""
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def checked_stream(path: str, specs: Sequence, tensors: Iterable[tuple[str, torch.Tensor]]):
    """``tensors`` one by one, each checked against its ``(name, dtype, shape)`` spec; a tensor other than
    the spec says, or a count other than the specs', is an error naming ``path`` (the file being written)."""
    stream = iter(tensors)
    for spec in specs:
        name, tensor = next(stream, (None, None))
        got = None if tensor is None else (name, tensor.dtype, tuple(tensor.shape))
        if got != tuple(spec):
            raise CheckpointError(f"writing {path}: expected tensor {spec}, got {got}.")
        yield name, tensor
    if next(stream, None) is not None:
        raise CheckpointError(f"writing {path}: more tensors than the {len(specs)} expected.")
