"""DoRA (weight-decomposed low-rank adaptation, Liu et al. 2024) on mftune's LoRA layer: PEFT's ``use_dora``.

A DoRA layer is a LoRA layer plus a trained magnitude vector ``m`` (``[out]``, the parameter
``mindpet_delta_lora_magnitude``; PEFT's ``lora_magnitude_vector``). Its weight is
``W' = m / ||W + s B A|| * (W + s B A)``, the norm taken over each output row. As in PEFT (and the
paper's section 4.3), the norm is a constant for the gradient. The layer computes
``y = x W^T + b + (m/n - 1) * x W^T + m/n * s * B A x``, with dropout applied to the x of the last two
terms. ``m`` starts as the norm itself, so a fresh layer is the base layer. The norm and ``m/n`` are
float32 whatever the compute dtype (peft rounds them to it; equal in float32). A zero row gives NaN, as in
peft.

The norm needs each whole row of ``W + s B A``. Under FSDP2 and a column-parallel layer every rank holds
whole rows (the magnitude is sharded like them); a row-parallel layer splits each row over the tensor-parallel
ranks, whose sums of squares are added (``init_magnitude``; in the forward, DTensor's norm does the same).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate

LORA_M = "mindpet_delta_lora_magnitude"  # the magnitude vector [out]


def row_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||W + scaling * B A||`` over each output row (``[out]``), in float32 (autocast off), without gradient."""
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        return torch.linalg.norm(torch.addmm(weight.float(), lora_b.float(), lora_a.float(), alpha=scaling), dim=1)


def dora_term(h: torch.Tensor, weight: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
              delta: torch.Tensor, scaling: float, base: torch.Tensor | None) -> torch.Tensor:
    """What DoRA adds to the base output: ``(m/n - 1) * base + m/n * scaling * delta``. ``delta = B A h``;
    ``base = h W^T`` when the caller has it (no dropout: the layer's own output less its bias), else
    computed from ``h`` (PEFT's order, so that the numbers match)."""
    scale = (magnitude.float() / norm).view(*([1] * (delta.dim() - 1)), -1)  # float32: m moves smoothly in bf16
    if base is None:
        base = F.linear(h.to(weight.dtype), weight)
    return (scale - 1) * base.float() + scale * delta.float() * scaling


def merged_weight(weight: torch.Tensor, magnitude: torch.Tensor, delta_weight: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m / ||W + dW|| * (W + dW), ||W + dW||)`` in float32: the merged weight and the norm that unmerging
    divides back out (``dW = s B A``)."""
    full = weight.float() + delta_weight
    norm = torch.linalg.norm(full, dim=1)
    return (magnitude.float() / norm).unsqueeze(1) * full, norm


def unmerged_weight(merged: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
                    delta_weight: torch.Tensor) -> torch.Tensor:
    """The inverse of ``merged_weight`` given the norm it returned, in float32."""
    return merged.float() / (magnitude.float() / norm).unsqueeze(1) - delta_weight


@torch.no_grad()
def init_magnitude(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor,
                   scaling: float) -> None:
    """``m = ||W + s B A||`` per row, in place, without gathering W. Sharded parameters: this rank's rows of W, B and
    m (FSDP2, a column-parallel layer) with A gathered over the ranks that split its rank dim (FSDP2); where W's
    columns are split (a row-parallel layer) each rank has a partial sum of squares, added over those ranks. A
    collective wherever parameters are sharded: every rank calls it for the same layers in the same order."""
    if weight.device.type == "meta":
        return
    a = lora_a
    if isinstance(a, DTensor):  # the whole rank dim, A's columns as W's
        a = a.redistribute(placements=[Replicate() if p.is_shard(0) else p for p in a.placements]).to_local()
    w, b, m = (t.to_local() if isinstance(t, DTensor) else t for t in (weight, lora_b, magnitude))
    if not (w.shape[0] == b.shape[0] == m.shape[0] and w.shape[1] == a.shape[1]):
        raise RuntimeError(f"DoRA magnitude of {m.shape[0]} rows over a weight block {list(w.shape)}, B "
                           f"{list(b.shape)}, A {list(a.shape)}: the blocks do not line up")
    with torch.autocast(w.device.type, enabled=False):
        squares = torch.addmm(w.float(), b.float(), a.float(), alpha=scaling).pow(2).sum(dim=1)  # [rows]
    if isinstance(weight, DTensor):
        for dim, placement in enumerate(weight.placements):
            if placement.is_shard(1):  # W's columns split over this mesh dim: partial sums
                dist.all_reduce(squares, group=weight.device_mesh.get_group(dim))
    m.copy_(squares.sqrt().to(m.dtype))
