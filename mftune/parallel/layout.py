"""Which part of a global tensor this rank holds, and how to fill it without the whole model.

A parameter is either a plain tensor (every rank holds all of it) or a ``DTensor`` placed by
``mftune.parallel`` (tensor parallel ``Shard``/``Replicate`` on the ``tp`` mesh dim, then FSDP2's
``Shard(0)`` of that local piece on the ``dp`` dim). Either way the rank's local tensor is one
rectangular block of the global tensor, which is what lets every rank read only its own bytes
of a checkpoint (``local_block``) and draw random initial values identical to a one-process
run (``fill_from_full``: draw the full tensor on the CPU, keep the block; one tensor at a time).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor, Placement

try:  # FSDP2 over tensor parallel marks its dp split as _StridedShard, which is not a Shard
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover - older torch
    _StridedShard = ()


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (``to_local()`` of a DTensor; the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def is_split(placement: Placement) -> bool:
    """Whether ``placement`` splits the tensor over its mesh dim (``Shard`` or FSDP2's ``_StridedShard``)."""
    return placement.is_shard() or isinstance(placement, _StridedShard)


def local_block(t: torch.Tensor) -> tuple[slice, ...]:
    """The index block (one slice per dim) of the global tensor that ``local(t)`` holds.

    Shards are applied from the last mesh dim to the first: tensor parallel (inner ``tp`` dim)
    splits the global tensor, FSDP2 (outer ``dp`` dim, possibly shown as ``_StridedShard``) splits
    what tensor parallel left. Both split like ``torch.chunk`` (ceil-sized pieces, the last ones
    shorter or empty). The result is checked against the local shape.
    """
    ranges = [(0, n) for n in t.shape]
    if isinstance(t, DTensor):
        mesh, coords = t.device_mesh, t.device_mesh.get_coordinate()
        for mesh_dim in reversed(range(mesh.ndim)):
            placement = t.placements[mesh_dim]
            if not is_split(placement):
                continue
            dim, parts, index = placement.dim % t.ndim, mesh.size(mesh_dim), coords[mesh_dim]
            lo, hi = ranges[dim]
            size = -(-(hi - lo) // parts)
            ranges[dim] = (min(lo + index * size, hi), min(lo + (index + 1) * size, hi))
        shape = tuple(hi - lo for lo, hi in ranges)
        if shape != tuple(t.to_local().shape):
            raise RuntimeError(f"unsupported layout {t.placements} on mesh {mesh}: computed local shape "
                               f"{shape}, holds {tuple(t.to_local().shape)}")
    return tuple(slice(lo, hi) for lo, hi in ranges)


def replica(t: torch.Tensor) -> tuple[int, int]:
    """``(index, count)``: ``count`` ranks hold the same block of ``t`` (its DTensor mesh dims that do not
    split it: tensor parallel's ``Replicate``), this rank being copy ``index`` of them; ``(0, 1)`` for a
    plain tensor (nothing says which other ranks hold it)."""
    if not isinstance(t, DTensor):
        return 0, 1
    mesh, coords = t.device_mesh, t.device_mesh.get_coordinate()
    index, count = 0, 1
    for mesh_dim, placement in enumerate(t.placements):
        if not is_split(placement):
            index, count = index * mesh.size(mesh_dim) + coords[mesh_dim], count * mesh.size(mesh_dim)
    return index, count


def shard_layout(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """``{name: {"global_shape", "block"}}`` for the tensors of which this rank holds only a part
    (empty when every tensor is held whole): what a per-rank checkpoint file records so that its
    shards can be put back together."""
    out = {}
    for name, t in tensors.items():
        block = [[s.start, s.stop] for s in local_block(t)]
        if any(hi - lo != n for (lo, hi), n in zip(block, t.shape)):
            out[name] = {"global_shape": list(t.shape), "block": block}
    return out


def strategy(named: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per tensor: global shape, dtype, the block this rank holds and its DTensor placements (what
    ``<output_dir>/strategy/ckpt_strategy_rank_{r}.json`` records for every parameter)."""
    return {name: {"global_shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                   "block": [[s.start, s.stop] for s in local_block(t)],
                   "placements": [str(p) for p in t.placements] if isinstance(t, DTensor) else []}
            for name, t in named.items()}


@torch.no_grad()
def fill_from_full(param: torch.Tensor, init: Callable[[torch.Tensor], object]) -> None:
    """Initialise ``param`` as ``init`` would initialise the full tensor on the CPU.

    The full tensor is drawn on the CPU under the global CPU generator, so a model initialised on
    N ranks (same seed) or on a GPU gets the same values as a one-process CPU run; only one full
    tensor exists at a time.
    """
    target = local(param)
    if not isinstance(param, DTensor) and target.device.type == "cpu":
        init(target)
        return
    full = torch.empty(param.shape, dtype=param.dtype, device="cpu")
    init(full)
    target.copy_(full[local_block(param)])
