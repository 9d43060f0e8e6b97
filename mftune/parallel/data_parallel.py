"""Data parallelism and the gradient arithmetic that must agree on every rank.

Two modes over the ``dp`` mesh dim (``parallel.enable_parallel_optimizer``):
- True: FSDP2 ``fully_shard`` per decoder layer and at the root. Frozen base weights, trainable
  weights, gradients and AdamW moments are all split over the data-parallel ranks; weights are
  all-gathered per layer for forward/backward (ZeRO-3, a superset of MindSpore's optimizer
  sharding, which splits optimizer state and the updated weights).
- False: every data-parallel rank keeps full replicas; gradients of trainable parameters are
  summed over the ``dp`` group with one coalesced all-reduce per dtype after backward.

Gradients are *summed* over data parallel, never averaged: the trainer divides the loss by the
number of supervised tokens in the whole global batch, so the sum is the one-process gradient.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from mftune.parallel.layout import is_split, local
from mftune.pet.prefix import prefix_encoder, prefix_modules


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, compute_dtype: torch.dtype) -> None:
    """Shard every decoder layer, then the rest (embedding, final norm, lm_head), over ``dp_mesh``.

    Parameters are all-gathered in ``compute_dtype`` (so fp32 adapters and bf16 frozen weights can
    share a layer); gradients are reduce-scattered in float32.
    """
    # cast_forward_inputs=False: autocast casts what it must; FSDP2 would otherwise round the
    # float32 RoPE tables passed to every layer to compute_dtype, unlike one process.
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                              cast_forward_inputs=False)
    for layer in model.model.layers:
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp)
    prefix = prefix_modules(model)
    if prefix:  # gathered in the prefix's own dtype (MindFormers' float16 by default), not compute_dtype
        dtype = prefix_encoder(model).config.compute_torch_dtype
        fully_shard(prefix, mesh=dp_mesh, mp_policy=MixedPrecisionPolicy(
            param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False))
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # torch >= 2.8 (setup.cfg)
            module.set_gradient_divide_factor(1.0)  # sum over dp (see the module docstring)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM


def reshard(model: nn.Module) -> None:
    """Free the parameters FSDP2 gathered for forwards that no backward followed (no_grad evaluation)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def all_reduce_grads(params: list[nn.Parameter], dp_group: dist.ProcessGroup) -> None:
    """Sum the local gradients of replicated-over-dp ``params`` across ``dp_group`` (coalesced)."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, group=dp_group)
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def settle_grads(params: list[nn.Parameter]) -> None:
    """Give every DTensor gradient its parameter's placements (e.g. a replicated LoRA A whose
    gradient came out as a partial sum over tensor-parallel ranks is all-reduced here)."""
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and g.placements != p.placements:
            p.grad = g.redistribute(p.device_mesh, p.placements)


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> float:
    """Global L2 norm of the gradients over every rank (each element counted once), then scale
    them by ``max_norm / norm`` when larger. Returns the norm before clipping (inf/nan on overflow).

    Works for any mix of plain and DTensor gradients on different meshes: local squared sums are
    bucketed by the mesh dims they are sharded over, and each bucket is summed over those dims
    only (replicated dims would count an element several times).
    """
    buckets: dict[tuple, list[torch.Tensor]] = {}
    device = None
    for p in params:
        g = p.grad
        if g is None:
            continue
        key: tuple = ()
        if isinstance(g, DTensor):
            key = (g.device_mesh, tuple(i for i, pl in enumerate(g.placements) if is_split(pl)))
        sq = local(g).detach().float().pow(2).sum()
        device = sq.device
        buckets.setdefault(key, []).append(sq)
    if device is None:
        return 0.0
    total = torch.zeros((), device=device)
    for key, values in buckets.items():
        s = torch.stack(values).sum()
        if key:
            mesh, dims = key
            for dim in dims:
                dist.all_reduce(s, group=mesh.get_group(dim))
        total += s
    norm = float(total.sqrt())
    coef = max_norm / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s coefficient
    if math.isfinite(norm) and coef < 1.0:
        for p in params:
            if p.grad is not None:
                local(p.grad).mul_(coef)
    return norm
