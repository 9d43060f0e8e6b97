"""``Entry``: one tensor of a checkpoint, known by its global shape, able to read any block of itself.

Every on-disk format (``mftune.checkpoint.formats``) turns a path into ``{mftune name: Entry}``;
loading, resharding, conversion, merging and export read tensors only through entries, so each
rank reads only the block it holds, whatever the format.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mftune.checkpoint.safetensors_io import FROM_ST, Block, read_block, safetensors_header
from mftune.errors import CheckpointError


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


def safetensors_entries(path: str, rename: Callable[[str], str | None] = lambda n: n) -> dict[str, Entry]:
    """The tensors of one safetensors file holding whole tensors (renamed; ``rename`` returning None
    skips a tensor). One rank's file of a distributed checkpoint is refused: it holds shards."""
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


def tensor_entries(tensors: dict[str, torch.Tensor], origin: str) -> dict[str, Entry]:
    """Entries over tensors already in memory (or memory-mapped, e.g. a ``.bin`` state dict)."""
    return {name: Entry(tuple(t.shape), lambda block, t=t: t[block], origin) for name, t in tensors.items()}


def merge_entries(path: str, parts: list[dict[str, Entry]]) -> dict[str, Entry]:
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


Pieces = list[tuple[str, tuple[tuple[int, int], ...]]]  # (file, the block of the global tensor it holds), replicas once


def assemble(name: str, block: Block, pieces: Pieces, read: Callable[[str, str, Block], torch.Tensor],
             dtype: torch.dtype, where: str) -> torch.Tensor:
    """The ``block`` of global tensor ``name`` put together from the rank files' ``pieces`` that overlap
    it, each read with ``read(file, name, block of the piece)``; values missing are an error naming
    ``where`` (a rank folder missing or incomplete). An empty block has ``dtype`` and no bytes."""
    out, filled = None, 0
    want = [(s.start or 0, s.stop) for s in block]
    for file, held in pieces:
        inter = [(max(lo, plo), min(hi, phi)) for (lo, hi), (plo, phi) in zip(want, held)]
        if any(lo >= hi for lo, hi in inter):
            continue
        src = read(file, name, tuple(slice(lo - plo, hi - plo) for (lo, hi), (plo, _) in zip(inter, held)))
        if out is None:
            out = torch.empty([hi - lo for lo, hi in want], dtype=src.dtype)
        out[tuple(slice(lo - wlo, hi - wlo) for (lo, hi), (wlo, _) in zip(inter, want))] = src
        filled += src.numel()
    numel = math.prod(hi - lo for lo, hi in want)
    if filled != numel:
        raise CheckpointError(f"distributed checkpoint {where}: the rank files hold {filled} of the {numel} values "
                              f"of {name} this rank needs; a rank_*/ folder is missing or incomplete.")
    return out if out is not None else torch.empty([hi - lo for lo, hi in want], dtype=dtype)
