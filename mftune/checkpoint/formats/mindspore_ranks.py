"""A distributed MindSpore checkpoint: ``<dir>/rank_{r}/*.ckpt``, one folder per rank (MindFormers'
``output/checkpoint``), read with the strategy of the run that saved it (``src_strategy_path_or_dir``:
its ``strategy/`` folder of ``ckpt_strategy_rank_{r}.ckpt`` files, or a merged strategy file).

Each rank folder's file is the one its ``meta.json`` names (MindFormers' ``last_ckpt_file``), else
its newest ``.ckpt`` (MindFormers' ``get_last_checkpoint``). A rank file holds the rank's slices of
the tensors (``integrated_save: False``, what MindFormers forces in parallel runs); the strategy
says which block of the global tensor each slice is (``mindspore.strategy``). Every tensor is an
entry whose ``read(block)`` assembles the block from the slices of the ranks that overlap it
(replicas read once), like ``formats.distributed`` does for mftune's own rank files, so it loads into
any layout. Tensors the strategy does not name (counters, the loss scale) are whole in every file:
rank 0's copy is read. A rank file may hold a tensor whole although the strategy slices it (a
stage-replicated copy): its copy is used for every block. Names and counters are mapped as for a
complete ``.ckpt`` (``formats.mindspore_ckpt``). The header is empty.
"""
from __future__ import annotations

import glob
import json
import math
import os
from typing import Any


from mftune.checkpoint.entries import Entry, Pieces, assemble, tensor_entries
from mftune.checkpoint.formats.distributed import rank_dirs
from mftune.checkpoint.mindspore.ckpt import ckpt_index, read_block, read_tensor
from mftune.checkpoint.mindspore.names import COUNTER_SOURCES, is_mindspore_state, mftune_counters, mftune_name
from mftune.checkpoint.mindspore.strategy import MindSporeStrategy, load_strategy
from mftune.errors import CheckpointError

STRATEGY_OPTION = "src_strategy_path_or_dir"
NEEDS_STRATEGY = True  # the slices each rank file holds are known only from the saving run's strategy


def matches(path: str) -> bool:
    """``rank_*/`` folders holding ``.ckpt`` files (and no ``.safetensors``: those are mftune's)."""
    dirs = rank_dirs(path)
    return bool(dirs) and bool(_ckpts(dirs[0])) and not glob.glob(os.path.join(glob.escape(dirs[0]), "*.safetensors"))


def _ckpts(rank_dir: str) -> list[str]:
    return glob.glob(os.path.join(glob.escape(rank_dir), "*.ckpt"))


def rank_file(rank_dir: str) -> str:
    """The file of one rank: the one its meta.json names (if it exists), else the newest .ckpt."""
    try:
        with open(os.path.join(rank_dir, "meta.json")) as f:
            named = os.path.join(rank_dir, json.load(f).get("last_ckpt_file") or "")
        if named.endswith(".ckpt") and os.path.isfile(named):
            return named
    except (OSError, ValueError, AttributeError):
        pass
    files = _ckpts(rank_dir)
    if not files:
        raise CheckpointError(f"distributed checkpoint folder {rank_dir} holds no .ckpt file.")
    return max(files, key=os.path.getmtime)


def entries(path: str, src_strategy: str = "") -> dict[str, Entry]:
    if not src_strategy:
        raise CheckpointError(
            f"load_checkpoint={path} is a distributed MindSpore checkpoint (rank_*/ folders of .ckpt files), "
            f"which needs the strategy of the run that saved it: pass --{STRATEGY_OPTION} (or the YAML key "
            f"{STRATEGY_OPTION}; transform_checkpoint.py: --src_strategy) with that run's strategy/ folder "
            f"(ckpt_strategy_rank_*.ckpt) or its merged strategy file.")
    strategy = load_strategy(src_strategy)
    files = _rank_files(path, strategy)
    indexes = [ckpt_index(f) for f in files]
    out = {}
    for name in dict.fromkeys(n for index in indexes for n in index.tensors):
        if not is_mindspore_state(name):
            out[mftune_name(name)] = _entry(path, name, files, indexes, strategy)
    counters = mftune_counters({n: read_tensor(files[0], n) for n in COUNTER_SOURCES if n in indexes[0].tensors})
    out.update(tensor_entries(counters, files[0]))
    return out


def header(path: str) -> dict[str, Any]:
    return {}


def _rank_files(path: str, strategy: MindSporeStrategy) -> list[str]:
    """Each rank's file, checked against the strategy's world size (rank_0 .. rank_{N-1}, none missing)."""
    dirs = {int(os.path.basename(d)[5:]): d for d in rank_dirs(path)}
    world = strategy.world_size
    missing = [r for r in range(world) if r not in dirs]
    if missing:
        raise CheckpointError(f"distributed checkpoint {path} lacks rank_{missing[0]}/ "
                              f"({len(missing)} of the {world} ranks of strategy {strategy.source} are missing). "
                              f"Copy every rank's folder (all nodes' output/checkpoint).")
    if len(dirs) != world:
        raise CheckpointError(f"distributed checkpoint {path} has {len(dirs)} rank folders but strategy "
                              f"{strategy.source} is of a {world}-rank layout. Pass the strategy of the run "
                              f"that saved the checkpoint.")
    return [rank_file(dirs[r]) for r in range(world)]


def _entry(root: str, name: str, files: list[str], indexes: list, strategy: MindSporeStrategy) -> Entry:
    held = {r: index.tensors[name] for r, index in enumerate(indexes) if name in index.tensors}
    smallest = min(held.values(), key=lambda s: math.prod(s.shape))
    found = strategy.holders(name, smallest.shape)
    if found is None:  # not in the strategy: whole in every rank file
        rank = min(held)
        shape, pieces = held[rank].shape, [(files[rank], tuple((0, n) for n in held[rank].shape))]
    else:
        shape, holders = found
        pieces = _pieces(name, shape, holders, held, files, strategy)
    return Entry(shape, lambda block: assemble(name, block, pieces, read_block, smallest.dtype, root), root,
                 smallest.dtype)


def _pieces(name: str, shape: tuple[int, ...], holders: list, held: dict, files: list[str],
            strategy: MindSporeStrategy) -> Pieces:
    """Each distinct block once, from the first rank holding it (a rank holding the tensor whole: all)."""
    pieces: Pieces = []
    for rank, block in holders:
        stored = held.get(rank)
        if stored is None:
            raise CheckpointError(f"checkpoint {files[rank]} (rank {rank}) lacks {name}, which strategy "
                                  f"{strategy.source} places on that rank: the strategy belongs to another run.")
        if stored.shape == shape and tuple(hi - lo for lo, hi in block) != shape:
            return [(files[rank], tuple((0, n) for n in shape))]  # this rank holds it whole
        if stored.shape != tuple(hi - lo for lo, hi in block):
            raise CheckpointError(
                f"checkpoint {files[rank]} (rank {rank}) holds {name} with shape {list(stored.shape)}, but strategy "
                f"{strategy.source} gives that rank the block {[list(b) for b in block]} of {list(shape)}: the "
                f"strategy belongs to another run.")
        if not any(b == block for _, b in pieces):
            pieces.append((files[rank], block))
    return pieces
