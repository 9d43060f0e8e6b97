"""MindSpore ``.ckpt`` files at the byte level: the index of a file, block reads, the streaming writer.

A ``.ckpt`` file is a serialized ``Checkpoint`` message (MindSpore's ``checkpoint.proto``)::

    message Checkpoint { message Value { required string tag = 1;
                                         oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
                         repeated Value value = 1; }
    message TensorProto { repeated int64 dims = 1; required string tensor_type = 2;
                          required bytes tensor_content = 3; }

written as one ``Checkpoint`` with one ``Value`` per ``write`` call and concatenated, which parses
as one message (``mindspore/train/serialization.py``, MindSpore 2.7: ``_exec_save``,
``_write_parameter_bytes_data``, ``_load_into_param_dict``). Facts this module relies on:

- a tensor larger than 512 MiB is stored as several consecutive Values with the same tag, each
  with the full dims and a run of the C-order bytes (``async_save`` splits along axis 0 with
  ``np.array_split`` instead); the reader joins the runs of consecutive Values with one tag, as
  MindSpore's loader does, and takes the last run when a tag comes back later;
- ``tensor_type`` is MindSpore's dtype name (``Float32``, ``BFloat16``, ...) and the content the raw
  little-endian bytes (bfloat16 too); a scalar has no dims; ``append_dict`` ints are Int64
  scalars, floats Float32 scalars, strings ``tensor_type "str"`` with dims ``[0]`` and UTF-32 bytes;
- ``crc_check=True`` appends ``b"crc_num"`` and a 10-byte big-endian CRC-32 of everything before
  it: recognised and skipped, not verified (that needs the whole file read);
- ``enc_key`` files are encrypted as a whole and cannot be read without MindSpore; they, and any
  file that is not such a message, are refused with a ``CheckpointError`` naming the file.

Invariants: a file is indexed once per version (path, size, mtime): the walk reads keys and
lengths only, never tensor bytes; block reads ``os.preadv`` exactly the bytes of the block (a row
range in one read per stored run); the writer streams tensor by tensor (peak ~ one tensor),
splits tensors into 512 MiB runs as MindSpore does, and is atomic (``mftune.fileio``).
"""
from __future__ import annotations

import bisect
import functools
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from mftune.checkpoint.mindspore.wire import (LEN, VARINT, Reader, Region, WireError, len_field, len_prefix,
                                              packed_varints, signed, varint_field)
from mftune.checkpoint.safetensors_io import checked_stream, tensor_bytes
from mftune.errors import CheckpointError
from mftune.fileio import atomic_open

logger = logging.getLogger("mftune")

Block = tuple[slice, ...]
Spec = tuple[str, torch.dtype, tuple[int, ...]]
MS_DTYPES: dict[str, torch.dtype] = {
    "Float64": torch.float64, "Float32": torch.float32, "Float16": torch.float16, "BFloat16": torch.bfloat16,
    "Int64": torch.int64, "Int32": torch.int32, "Int16": torch.int16, "Int8": torch.int8, "UInt8": torch.uint8,
    "UInt16": torch.uint16, "UInt32": torch.uint32, "UInt64": torch.uint64, "Bool": torch.bool}
TO_MS_DTYPE = {v: k for k, v in MS_DTYPES.items()}
RUN_BYTES = 512 * 2**20  # MindSpore's chunk: 1024 * SLICE_SIZE (KB) in _write_parameter_bytes_data
CRC_MARK, CRC_TAIL = b"crc_num", 17  # the mark and the 10-byte CRC after it
READ_CHUNK = 64 * 2**20  # bytes read at a time when only some columns of 3+-D rows are wanted


@dataclass(frozen=True)
class Stored:
    """One tensor of a file: its dtype, shape and the runs of its bytes."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    runs: tuple[tuple[int, int], ...]  # (offset in the file, bytes) of each stored run, in order
    starts: tuple[int, ...]  # each run's first byte within the tensor's bytes


@dataclass(frozen=True)
class CkptIndex:
    tensors: dict[str, Stored]  # the tensors mftune reads, in file order
    others: dict[str, str]  # tag -> what it holds, for what is not such a tensor (a string, a map tensor)
    crc: bool  # whether the file ends with MindSpore's crc_num trailer


def is_ckpt(path: str) -> bool:
    """MindSpore names its checkpoint files ``*.ckpt`` (``load_checkpoint`` refuses other names)."""
    return path.endswith(".ckpt")


def ckpt_index(path: str) -> CkptIndex:
    """The index of a ``.ckpt`` file, built once per file version (path, size, mtime)."""
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({exc}). Check load_checkpoint.") from None
    return _index(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _index(path: str, size: int, mtime_ns: int) -> CkptIndex:
    try:
        with open(path, "rb", buffering=0) as f:
            reader = Reader(f.fileno(), size)
            crc = size >= CRC_TAIL and reader.read(size - CRC_TAIL, len(CRC_MARK)) == CRC_MARK
            values = list(_values(reader, size - CRC_TAIL if crc else size))
    except (OSError, WireError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is not a readable MindSpore checkpoint ({type(exc).__name__}: {exc}); it may be "
            f"truncated, encrypted (enc_key: decrypt it with MindSpore first) or another kind of file. mftune "
            f"reads .ckpt files written by mindspore.save_checkpoint.") from None
    if not values:
        raise CheckpointError(f"checkpoint {path} holds no tensors ({size} bytes): an interrupted save, or not "
                              f"a MindSpore checkpoint.")
    return _join_runs(path, values, crc)


def _values(reader: Reader, end: int):
    """``(tag, kind, dims, tensor_type, (offset, length))`` of each Value of the file."""
    for number, kind, value in reader.region(0, end).fields():
        if number != 1 or kind != LEN:
            raise WireError(f"field {number} (wire type {kind}) where a Checkpoint.Value belongs")
        tag, tensor, is_map = None, None, False
        for n, k, v in reader.region(*value).fields():
            if n == 1 and k == LEN:
                tag = reader.read(*v).decode()
            elif n == 2 and k == LEN:
                tensor = _tensor(reader, v)
            elif n == 3 and k == LEN:
                is_map = True
        if tag is None or (tensor is None and not is_map):
            raise WireError(f"a Checkpoint.Value at byte {value[0]} lacks its tag or its tensor")
        yield (tag, "map", (), "", (0, 0)) if tensor is None else (tag, "tensor", *tensor)


def _tensor(reader: Reader, where: tuple[int, int]) -> tuple[tuple[int, ...], str, tuple[int, int]]:
    dims, dtype, content = [], None, None
    for n, k, v in Region(reader, where[0], where[0] + where[1]).fields():
        if n == 1 and k in (VARINT, LEN):
            dims += packed_varints(v if k == VARINT else reader.read(*v))
        elif n == 2 and k == LEN:
            dtype = reader.read(*v).decode()
        elif n == 3 and k == LEN:
            content = v
    if dtype is None or content is None:
        raise WireError(f"a TensorProto at byte {where[0]} lacks its tensor_type or tensor_content")
    return tuple(signed(d) for d in dims), dtype, content


def _join_runs(path: str, values: list, crc: bool) -> CkptIndex:
    """Consecutive Values with one tag are one tensor (MindSpore's loader); a tag seen again later
    replaces the earlier tensor, as MindSpore's loader does."""
    groups: list[tuple[str, list]] = []
    for value in values:
        if groups and groups[-1][0] == value[0] and value[1] == "tensor":
            groups[-1][1].append(value)
        else:
            groups.append((value[0], [value]))
    tensors: dict[str, Stored] = {}
    others: dict[str, str] = {}
    for tag, parts in groups:
        if tag in tensors or tag in others:
            logger.warning("checkpoint %s stores %s twice; the later one is used (as MindSpore does)", path, tag)
            tensors.pop(tag, None), others.pop(tag, None)
        _, kind, dims, type_name, _ = parts[-1]
        if kind == "map":
            others[tag] = "a MapTensor (MindSpore's hash-map embedding), not read"
        elif type_name == "str":
            others[tag] = "a string (save_checkpoint's append_dict; ckpt.string_value reads it)"
        elif type_name not in MS_DTYPES:
            others[tag] = f"a value of MindSpore type {type_name!r}, not read as a tensor"
        else:
            tensors[tag] = _stored(path, tag, parts)
    return CkptIndex(tensors, others, crc)


def _stored(path: str, tag: str, parts: list) -> Stored:
    _, _, dims, type_name, _ = parts[-1]
    if any(p[3] != type_name for p in parts):
        raise CheckpointError(f"checkpoint {path}: the stored parts of {tag} have different dtypes "
                              f"({sorted({p[3] for p in parts})}); the file is damaged.")
    dtype, runs = MS_DTYPES[type_name], tuple(p[4] for p in parts)
    shape = () if list(dims) == [0] else dims  # MindSpore's loader reads dims [0] as a scalar
    if any(d < 0 for d in shape) or sum(n for _, n in runs) != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(f"checkpoint {path}: tensor {tag} stores {sum(n for _, n in runs)} bytes but its "
                              f"shape {list(shape)} of {type_name} needs {math.prod(shape) * dtype.itemsize}; the "
                              f"file is damaged.")
    starts = [0]
    for _, n in runs[:-1]:
        starts.append(starts[-1] + n)
    return Stored(dtype, tuple(shape), runs, tuple(starts))


def string_value(path: str, tag: str) -> str | None:
    """A string MindSpore saved through ``append_dict`` (None when ``tag`` is not one)."""
    with open(path, "rb", buffering=0) as f:
        reader = Reader(f.fileno(), os.fstat(f.fileno()).st_size)
        size = reader.size - CRC_TAIL if ckpt_index(path).crc else reader.size
        found = [v for v in _values(reader, size) if v[0] == tag and v[3] == "str"]
        return reader.read(*found[-1][4]).decode("utf-32-le").rstrip("\0") if found else None


# ----------------------------------------------------------------------------------------------
# reads
# ----------------------------------------------------------------------------------------------

def read_tensor(path: str, name: str) -> torch.Tensor:
    return read_block(path, name, tuple(slice(None) for _ in ckpt_index(path).tensors[name].shape))


def read_block(path: str, name: str, block: Block, out: torch.Tensor | None = None) -> torch.Tensor:
    """``block`` of tensor ``name``: a row range in one read per stored run, a column range of a
    matrix one read per row, other blocks of 3+-D tensors through whole rows a chunk at a time.
    ``out``: a contiguous tensor of the block's shape and the file's dtype to read into."""
    t = ckpt_index(path).tensors[name]
    ranges = [(s.start or 0, n if s.stop is None else s.stop) for s, n in zip(block, t.shape)]
    want = [hi - lo for lo, hi in ranges]
    if out is None:
        out = torch.empty(want, dtype=t.dtype)
    elif list(out.shape) != want or out.dtype != t.dtype or not out.is_contiguous():
        raise ValueError(f"read_block into {tuple(out.shape)} {out.dtype}: {name} block is {want} {t.dtype}")
    if out.numel() == 0:
        return out
    with open(path, "rb", buffering=0) as f:
        def fill(offset: int, target: torch.Tensor) -> torch.Tensor:
            _pread_runs(f.fileno(), t, offset, memoryview(target.view(-1).view(torch.uint8).numpy()), path, name)
            return target

        item = t.dtype.itemsize
        row = math.prod(t.shape[1:]) * item
        if not t.shape or all(r == (0, n) for r, n in zip(ranges[1:], t.shape[1:])):
            return fill(ranges[0][0] * row if t.shape else 0, out)  # whole rows: straight into out
        (lo, hi), rest = ranges[0], block[1:]
        if len(t.shape) == 2:  # a column range (row-parallel weights): only those bytes of each row
            for i in range(hi - lo):
                fill((lo + i) * row + ranges[1][0] * item, out[i])
            return out
        step = max(1, READ_CHUNK // max(row, 1))
        for r in range(lo, hi, step):
            rows = fill(r * row, torch.empty([min(step, hi - r), *t.shape[1:]], dtype=t.dtype))
            out[r - lo:r - lo + len(rows)] = rows[(slice(None), *rest)]
    return out


def _pread_runs(fd: int, t: Stored, offset: int, view: memoryview, path: str, name: str) -> None:
    """Fill ``view`` with the tensor's bytes from ``offset`` on, across its stored runs."""
    i, done = bisect.bisect_right(t.starts, offset) - 1, 0
    while done < len(view):
        (at, size), start = t.runs[i], t.starts[i]
        skip = offset + done - start
        take = min(size - skip, len(view) - done)
        got = os.preadv(fd, [view[done:done + take]], at + skip) if take > 0 else 0
        if got <= 0 and take > 0:
            raise CheckpointError(f"checkpoint {path} ends before the data of {name}: it is truncated.")
        done += got
        if got == take:
            i += 1


# ----------------------------------------------------------------------------------------------
# writes
# ----------------------------------------------------------------------------------------------

def value_head(tag: str, dtype: torch.dtype, shape: Sequence[int], size: int) -> bytes:
    """A Checkpoint with one Value, up to its ``size`` content bytes (written after it)."""
    tensor = b"".join(varint_field(1, d) for d in shape) + len_field(2, TO_MS_DTYPE[dtype].encode())
    tensor += len_prefix(3, size)
    value = len_field(1, tag.encode()) + len_prefix(2, len(tensor) + size) + tensor
    return len_prefix(1, len(value) + size) + value


def write_ckpt_streaming(path: str, specs: Sequence[Spec], tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Write a ``.ckpt`` file tensor by tensor, in ``specs`` order, as ``mindspore.save_checkpoint``
    does (runs of at most 512 MiB, no CRC, no encryption). ``tensors`` yields ``(name, tensor)``,
    each checked against its spec; peak memory is one tensor. Atomic. Returns the data bytes."""
    names = [s[0] for s in specs]
    bad = [f"{n} ({d})" for n, d, _ in specs if d not in TO_MS_DTYPE] + sorted(
        {n for n in names if names.count(n) > 1})
    if bad:
        raise CheckpointError(f"tensor(s) {', '.join(bad)} cannot be written to {path}: a duplicate name or a "
                              f"dtype MindSpore checkpoints do not hold.")
    total = 0
    with atomic_open(path, "wb") as f:
        for name, tensor in checked_stream(path, specs, tensors):
            data = tensor_bytes(tensor)
            for begin in range(0, max(len(data), 1), RUN_BYTES):
                run = data[begin:begin + RUN_BYTES]
                f.write(value_head(name, tensor.dtype, tuple(tensor.shape), len(run)))
                f.write(run)
            total += len(data)
            del tensor, data  # not held while the next one is read
    return total
