"""Small collectives over the whole job: every rank calls them at the same point of a run.

Integers only (``gather_ints``): one tensor all_gather works the same on gloo and NCCL, with no
pickling. ``host_id`` tells the ranks of one machine apart from the others'.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from mftune.fileio import HOST


def distributed() -> bool:
    """Whether a process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_ints(values: list[int]) -> list[list[int]]:
    """``values`` of every rank, in rank order (``[values]`` alone without a process group). Every rank
    passes the same number of values, each in int64's range."""
    if not distributed():
        return [list(values)]
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [t.tolist() for t in every]


def host_id() -> int:
    """This machine's id: the host tag fileio puts in temporary names, as an integer."""
    return int(HOST, 16)
