"""Activation checkpointing ("recompute" in MindFormers) applied to a plain model.

Each decoder layer's forward is wrapped in ``torch.utils.checkpoint`` on the instance, so
parameter names (and therefore checkpoints) are unchanged; hooks that other wrappers (FSDP2)
register on the module still run, because they live in ``__call__``, not ``forward``.
"""
from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def apply_recompute(layers: nn.ModuleList) -> int:
    """Recompute every layer's activations in backward instead of keeping them; returns the count."""
    for layer in layers:
        if getattr(layer, "_mftune_recompute", False):
            continue
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
        layer._mftune_recompute = True
    return len(layers)
