"""What ``--load_checkpoint`` can point at, as one map ``{mftune name: Entry}``.

An ``Entry`` knows a tensor's global shape and reads any block of it, so the loader (``io.py``)
reads only the block each rank holds, whatever the source:

- a complete mftune ``.safetensors`` file;
- a directory of complete files, loaded together (e.g. a base and a LoRA checkpoint, as
  MindFormers loads every file of a directory); a name in two files is an error;
- a Hugging Face directory (``config.json`` + ``model.safetensors`` / sharded safetensors with
  their index / ``pytorch_model*.bin``): names translated on the fly, nothing written;
- a PEFT LoRA adapter directory (``adapter_config.json``): its adapters, renamed, plus any
  complete ``.safetensors`` file placed beside them (the base);
- a distributed checkpoint directory (``rank_{r}/``, as the trainer saves it): each rank's file is
  the one its ``meta.json`` names (else its newest); a block is assembled from the pieces of the
  rank files that overlap it, using the global shape and block each file records in its header.
"""
from __future__ import annotations

import functools
import glob
import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch

Block = tuple[slice, ...]
ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL"}
FROM_ST = {v: k for k, v in ST_DTYPES.items()}
READ_CHUNK = 64 * 2**20  # bytes read at a time when only some columns of the rows are wanted
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file, the tensor and the fix."""


@dataclass
class Entry:
    shape: tuple[int, ...]
    read: Callable[[Block], torch.Tensor]  # the block of the global tensor, on the CPU
    origin: str  # the file it comes from, for messages
    known_dtype: torch.dtype | None = None  # when the source's header says it
    read_into: Callable[[Block, torch.Tensor], None] | None = None  # fill a contiguous tensor of known_dtype

    def full(self) -> torch.Tensor:
        return self.read(tuple(slice(0, n) for n in self.shape))

    @property
    def dtype(self) -> torch.dtype:
        """From the header when known, else from a one-element read."""
        if self.known_dtype is None:
            self.known_dtype = self.read(tuple(slice(0, min(n, 1)) for n in self.shape)).dtype
        return self.known_dtype


def source_kind(path: str) -> str:
    """How ``open_checkpoint`` reads ``path``: file, peft, hf, distributed or files (a directory
    of complete files)."""
    if os.path.isfile(path):
        return "file"
    if not os.path.isdir(path):
        raise CheckpointError(f"load_checkpoint={path} does not exist. Give a checkpoint file or directory.")
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        return "peft"
    if os.path.exists(os.path.join(path, "config.json")) and any(
            os.path.exists(os.path.join(path, f)) for f in HF_WEIGHTS):
        return "hf"
    return "distributed" if rank_dirs(path) else "files"


def open_checkpoint(path: str) -> dict[str, Entry]:
    """Every tensor ``path`` provides, by mftune name (see the module docstring)."""
    kind = source_kind(path)
    if kind == "file":
        return safetensors_entries(path)
    if kind == "peft":  # + complete files beside it (a base)
        from mftune.checkpoint.peft import read_peft_adapter
        tensors, _ = read_peft_adapter(path)
        entries = {n: Entry(tuple(t.shape), lambda block, t=t: t[block], path) for n, t in tensors.items()}
        others = [f for f in glob.glob(os.path.join(glob.escape(path), "*.safetensors"))
                  if os.path.basename(f) != "adapter_model.safetensors"]
        return _merge(path, [entries] + [safetensors_entries(f) for f in sorted(others)])
    if kind == "hf":
        return _hf_entries(path)
    if kind == "distributed":
        return distributed_entries(path)
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    if not files:
        raise CheckpointError(
            f"load_checkpoint={path} is a directory with no checkpoint mftune recognises: expected "
            f".safetensors files, a Hugging Face model (config.json + weights), a PEFT adapter "
            f"(adapter_config.json) or rank_*/ folders of a distributed checkpoint.")
    return _merge(path, [safetensors_entries(f) for f in files])


def _merge(path: str, parts: list[dict[str, Entry]]) -> dict[str, Entry]:
    """The union of several files' tensors; a name in two of them is an error naming both."""
    entries: dict[str, Entry] = {}
    for part in parts:
        for name, entry in part.items():
            if name in entries:
                raise CheckpointError(
                    f"load_checkpoint={path}: tensor {name} is in both {entries[name].origin} and "
                    f"{entry.origin}. Keep one of them in the directory.")
            entries[name] = entry
    return entries


def safetensors_entries(path: str, rename: Callable[[str], str | None] = lambda n: n) -> dict[str, Entry]:
    """The tensors of one safetensors file (renamed; ``rename`` returning None skips a tensor)."""
    _, header, metadata = safetensors_header(path)
    if "mftune_shards" in metadata:
        raise CheckpointError(
            f"checkpoint {path} holds one rank's shards of a distributed checkpoint; pass the "
            f"directory that holds its rank_*/ folders to load the whole checkpoint.")
    entries = {}
    for key, info in header.items():
        name = rename(key)
        if name is not None:
            entries[name] = Entry(tuple(info["shape"]), lambda block, key=key: read_block(path, key, block), path,
                                  FROM_ST[info["dtype"]],
                                  lambda block, out, key=key: read_block(path, key, block, out))
    return entries


def safetensors_header(path: str) -> tuple[int, dict, dict]:
    """(offset of the data section, ``{name: {dtype, shape, data_offsets}}``, metadata) of a
    safetensors file, parsed and checked once per file version (path, size, mtime)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} does not exist. Check load_checkpoint.")
    stat = os.stat(path)
    return _parse_header(path, stat.st_size, stat.st_mtime_ns)


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


def read_tensor(path: str, key: str) -> torch.Tensor:
    """The whole tensor ``key`` of a safetensors file (``read_block``)."""
    return read_block(path, key, tuple(slice(None) for _ in safetensors_header(path)[1][key]["shape"]))


def read_block(path: str, key: str, block: Block, out: torch.Tensor | None = None) -> torch.Tensor:
    """``block`` of tensor ``key``: its byte ranges read from the file (a row range in one read; a
    column range of a matrix with one read per row; other blocks of 3+-D tensors through whole rows,
    a chunk at a time). No memory map, so nothing of the file stays mapped, and no per-read header
    parse (the header is cached). ``out``: a contiguous tensor of the block's shape and the file's
    dtype to read into (e.g. a parameter's local shard: no temporary copy)."""
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


def _hf_entries(hf_dir: str) -> dict[str, Entry]:
    """A Hugging Face Llama directory, renamed to mftune names (rotary buffers skipped)."""
    from mftune.checkpoint.names import hf_to_mftune, is_hf_buffer

    unknown: list[str] = []

    def rename(hf_name: str) -> str | None:
        if is_hf_buffer(hf_name):
            return None
        try:
            return hf_to_mftune(hf_name)
        except KeyError:
            unknown.append(hf_name)
            return None

    entries: dict[str, Entry] = {}
    for file in _hf_weight_files(hf_dir):
        if file.endswith(".safetensors"):
            entries.update(safetensors_entries(file, rename))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for hf_name, t in state.items():
                name = rename(hf_name)
                if name is not None:
                    entries[name] = Entry(tuple(t.shape), lambda block, t=t: t[block], file)
    if unknown:
        raise CheckpointError(f"Hugging Face checkpoint {hf_dir} has tensors that are not Llama weights: "
                              f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}. Use a "
                              f"LlamaForCausalLM checkpoint.")
    return entries


def _hf_weight_files(hf_dir: str) -> list[str]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.exists(os.path.join(hf_dir, index)):
            with open(os.path.join(hf_dir, index)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            missing = [f for f in files if not os.path.exists(os.path.join(hf_dir, f))]
            if missing:
                raise CheckpointError(f"Hugging Face checkpoint {hf_dir}: {index} lists {missing[0]}, which "
                                      f"is missing. Copy the whole model directory.")
            return [os.path.join(hf_dir, f) for f in files]
        if os.path.exists(os.path.join(hf_dir, single)):
            return [os.path.join(hf_dir, single)]
    raise CheckpointError(f"Hugging Face checkpoint {hf_dir} has no weights ({', '.join(HF_WEIGHTS)}).")


def rank_file(rank_dir: str) -> str:
    """The file of one rank: the one its meta.json names (the last complete save), else the newest."""
    meta = os.path.join(rank_dir, "meta.json")
    if os.path.exists(meta):
        try:
            with open(meta) as f:
                info = json.load(f)
        except (OSError, ValueError) as exc:
            info = exc
        if not isinstance(info, dict):
            raise CheckpointError(f"{meta} cannot be read ({info}). Restore it, or remove it to use the "
                                  f"folder's newest file.")
        file = os.path.join(rank_dir, info.get("last_ckpt_file") or "")
        if os.path.isfile(file):
            size = info.get("file_size")
            if size is not None and os.path.getsize(file) != size:
                raise CheckpointError(f"checkpoint {file} has {os.path.getsize(file)} bytes but {meta} "
                                      f"recorded {size}: it was truncated or replaced. Restore it or "
                                      f"remove the folder's meta.json to use the newest file.")
            return file
    files = glob.glob(os.path.join(glob.escape(rank_dir), "*.safetensors"))
    if not files:
        raise CheckpointError(f"distributed checkpoint folder {rank_dir} holds no .safetensors file.")
    return max(files, key=os.path.getmtime)


def rank_dirs(root: str) -> list[str]:
    """``root/rank_0``, ``rank_1``, ... in rank order."""
    found = glob.glob(os.path.join(glob.escape(root), "rank_*"))
    return sorted((d for d in found if os.path.basename(d)[5:].isdigit()),
                  key=lambda d: int(os.path.basename(d)[5:]))


def rank_files(root: str) -> list[str]:
    """Each rank folder's last complete file, in rank order."""
    return [rank_file(d) for d in rank_dirs(root)]


def file_blocks(file: str) -> dict[str, tuple[tuple[int, ...], tuple[tuple[int, int], ...]]]:
    """``{name: (global shape, block held)}`` of a rank file (its ``mftune_shards`` header; a
    tensor it does not list, or a file without one, is held whole)."""
    _, header, meta = safetensors_header(file)
    try:
        held = json.loads(meta["mftune_shards"])["tensors"] if "mftune_shards" in meta else {}
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {file}: its mftune_shards header is damaged ({exc}).") from None
    out = {}
    for key, info in header.items():
        shape = tuple(info["shape"])
        held_info = held.get(key, {"global_shape": shape, "block": [[0, n] for n in shape]})
        out[key] = (tuple(held_info["global_shape"]), tuple(tuple(b) for b in held_info["block"]))
    return out


def distributed_entries(root: str, files: list[str] | None = None) -> dict[str, Entry]:
    """Tensors of a rank_{r}/ checkpoint (``files``: one per rank; default: each rank's last
    complete file), each assembled from the rank files' pieces."""
    pieces: dict[str, list[tuple[str, tuple[tuple[int, int], ...]]]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for file in files or rank_files(root):
        header = safetensors_header(file)[1]  # cached: file_blocks parses the same header
        for key, (shape, block) in file_blocks(file).items():
            shapes[key], dtypes[key] = shape, FROM_ST[header[key]["dtype"]]
            if not any(b == block for _, b in pieces.setdefault(key, [])):  # replicas: read one copy
                pieces[key].append((file, block))
    return {name: Entry(shapes[name], lambda block, name=name: _assemble(name, block, pieces[name]),
                        root, dtypes[name]) for name in pieces}


def _assemble(name: str, block: Block, pieces: list) -> torch.Tensor:
    out, filled = None, 0
    want = [(s.start or 0, s.stop) for s in block]
    for file, held in pieces:
        inter = [(max(lo, plo), min(hi, phi)) for (lo, hi), (plo, phi) in zip(want, held)]
        if any(lo >= hi for lo, hi in inter):
            continue
        src = read_block(file, name, tuple(slice(lo - plo, hi - plo) for (lo, hi), (plo, _) in zip(inter, held)))
        if out is None:
            out = torch.empty([hi - lo for lo, hi in want], dtype=src.dtype)
        out[tuple(slice(lo - wlo, hi - wlo) for (lo, hi), (wlo, _) in zip(inter, want))] = src
        filled += src.numel()
    numel = 1
    for lo, hi in want:
        numel *= hi - lo
    if filled != numel:
        raise CheckpointError(f"distributed checkpoint: the rank files hold {filled} of the {numel} values "
                              f"of {name} this rank needs; a rank_*/ folder is missing or incomplete.")
    if out is None:  # an empty block (e.g. the last rank's piece of a short tensor): right dtype, no bytes
        dtype = FROM_ST[safetensors_header(pieces[0][0])[1][name]["dtype"]]
        out = torch.empty([hi - lo for lo, hi in want], dtype=dtype)
    return out
