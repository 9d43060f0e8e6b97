"""Parallelism applied to a plain model: tensor/sequence parallel (DTensor), recompute, FSDP2.

``parallelize`` runs in torchtitan's order (STYLE #2): tensor-parallel plan -> activation
checkpointing -> data parallel (FSDP2), on a model built on the meta device with PET applied and
trainable parameters already float32. The caller then materialises it (``to_empty``) and fills it
(``mftune.parallel.layout``: each rank reads / draws only its own block).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from mftune.parallel.data_parallel import apply_fsdp
from mftune.parallel.mesh import ParallelContext
from mftune.parallel.recompute import LayerRecompute, apply_recompute
from mftune.parallel.tensor_parallel import apply_tensor_parallel

logger = logging.getLogger("mftune")


def parallelize(model: nn.Module, ctx: ParallelContext, *, vocab_emb_dp: bool, use_seq_parallel: bool,
                parallel_optimizer: bool, recompute: Sequence[LayerRecompute], compute_dtype: torch.dtype) -> None:
    """Apply the layout of ``ctx.mesh`` (dims ``dp``, ``tp``) to ``model`` in place; on one process
    (no mesh) only activation checkpointing applies."""
    if ctx.tp_size > 1:
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        apply_tensor_parallel(model, ctx.mesh["tp"], vocab_parallel=not vocab_emb_dp,
                              seq_parallel=use_seq_parallel)
        for name, p in model.named_parameters():  # torch's SequenceParallel re-creates norm
            p.requires_grad_(name not in frozen)  # weights as trainable Parameters
    if any(recompute):
        logger.info("Recompute: %s", apply_recompute(model.model.layers, recompute))
    fsdp = parallel_optimizer and ctx.dp_size > 1
    if fsdp:
        apply_fsdp(model, ctx.mesh["dp"], compute_dtype)
    if ctx.mesh is None:
        return
    logger.info("Parallel layout: data_parallel=%d (%s), model_parallel=%d (%s%s)",
                ctx.dp_size, "FSDP2: weights, gradients and optimizer state sharded" if fsdp
                else "replicas, gradient all-reduce", ctx.tp_size,
                "vocab-parallel embedding/lm_head" if not vocab_emb_dp else "replicated embedding/lm_head",
                ", sequence parallel" if use_seq_parallel and ctx.tp_size > 1 else "")
