"""Safetensors files at the byte level: the one header parser, block reads, and the writers.

A safetensors file is an 8-byte little-endian header length, a JSON header (``__metadata__``:
str -> str, then per tensor its dtype, shape and ``data_offsets`` into the data section), then the
raw bytes. mftune's header metadata keys start with ``mftune_`` and hold JSON (``read_metadata``).

Invariants: the header is parsed and checked once per file version (path, size, mtime) and cached;
reads use ``os.preadv`` on exactly the bytes of the block asked for (no memory map, so nothing of
the file stays mapped); writes are atomic (``mftune.fileio``).
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
from safetensors.torch import save_file

from mftune.errors import CheckpointError
from mftune.fileio import atomic_open, atomic_path

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
    """The ``mftune_*`` header entries of a file, JSON-decoded, without the prefix."""
    out = {}
    for key, value in safetensors_header(path)[2].items():
        if key.startswith(METADATA_PREFIX):
            try:
                out[key[len(METADATA_PREFIX):]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[len(METADATA_PREFIX):]] = value
    return out


def encode_metadata(entries: dict[str, Any]) -> dict[str, str]:
    """``{"format": "pt", "mftune_<key>": JSON}``: the header metadata of a file mftune writes."""
    return {"format": "pt", **{f"{METADATA_PREFIX}{k}": json.dumps(v, default=str) for k, v in entries.items()}}


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
    read into (e.g. a parameter's local shard: no temporary copy)."""
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
    if not shape:  # a scalar
        return _pread(path, begin, out)
    if out.numel() == 0:
        return out
    row = math.prod(shape[1:]) * dtype.itemsize
    (lo, hi), rest = ranges[0], block[1:]
    if all(r == (0, n) for r, n in zip(ranges[1:], shape[1:])):  # whole rows: straight into out
        return _pread(path, begin + lo * row, out)
    if len(shape) == 2:  # a column range (row-parallel weights): one read of just those bytes per row
        (c0, _), width = ranges[1], out.shape[1] * dtype.itemsize
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        with open(path, "rb", buffering=0) as f:
            for i in range(hi - lo):
                if os.preadv(f.fileno(), [view[i * width:(i + 1) * width]],
                             begin + (lo + i) * row + c0 * dtype.itemsize) != width:
                    raise CheckpointError(f"checkpoint {path} ends before the data of {key}: it is truncated.")
        return out
    step = max(1, READ_CHUNK // max(row, 1))
    for r in range(lo, hi, step):
        rows = _pread(path, begin + r * row, torch.empty([min(step, hi - r), *shape[1:]], dtype=dtype))
        out[r - lo:r - lo + len(rows)] = rows[(slice(None), *rest)]
    return out


def _pread(path: str, offset: int, out: torch.Tensor) -> torch.Tensor:
    """Fill the contiguous tensor ``out`` with the bytes of ``path`` from ``offset``."""
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < len(view):
            n = os.preadv(f.fileno(), [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"checkpoint {path} ends before the data of a tensor: it is truncated.")
            done += n
    return out


# ----------------------------------------------------------------------------------------------
# writes
# ----------------------------------------------------------------------------------------------

def save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write ``tensors`` (all in memory) to ``path`` atomically."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, tmp, metadata=metadata)


def write_safetensors_streaming(path: str, specs: Sequence[Spec], tensors: Iterable[tuple[str, torch.Tensor]],
                                metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file whose header is built from ``specs`` before any tensor is read.

    ``tensors`` yields ``(name, tensor)`` in ``specs`` order (e.g. a generator reading one at a time),
    each checked against its spec; the header is padded with spaces to a multiple of 8. Peak memory
    is one tensor. Atomic. Returns the number of data bytes.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        if name in header or dtype not in ST_DTYPES:
            raise CheckpointError(f"tensor {name} ({dtype}) cannot be written to {path}: duplicate name or dtype.")
        end = offset + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, tensor in checked_stream(path, specs, tensors):
            f.write(tensor_bytes(tensor))
            del tensor  # not held while the next one is read: peak ~ one tensor
    return offset


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
