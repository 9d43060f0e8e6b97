"""A distributed checkpoint: ``<dir>/rank_{r}/`` folders, one per saving rank, as the trainer and the
transform write them.

Each rank folder's file is the one its ``meta.json`` names (the last complete save; its recorded
size is checked), else its newest. A rank file holds that rank's blocks of the tensors, and its
``mftune_shards`` header records each block's global shape and position; a block wanted by a
reader is assembled from the pieces of the rank files that overlap it (replicas read once).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any

import torch

from mftune.checkpoint.entries import Entry, assemble
from mftune.checkpoint.safetensors_io import FROM_ST, read_block, read_metadata, safetensors_header
from mftune.errors import CheckpointError


def matches(path: str) -> bool:
    return bool(rank_dirs(path))


def entries(path: str) -> dict[str, Entry]:
    """Every tensor of the checkpoint, from each rank folder's last complete file."""
    return distributed_entries(path)


def header(path: str) -> dict[str, Any]:
    """The header the ranks share (rank 0's), without its own shard table."""
    meta = read_metadata(rank_file(rank_dirs(path)[0]))
    meta.pop("shards", None)
    return meta


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
    return {name: Entry(shapes[name], lambda block, name=name: assemble(name, block, pieces[name], read_block,
                                                                        dtypes[name], root),
                        root, dtypes[name]) for name in pieces}
