"""Activation checkpointing ("recompute" in MindFormers) applied to a plain model, layer by layer as
MindFormers' ``recompute_config`` chooses (its ``LayerSetting``, mindformers/models/utils.py r1.3).

- ``recompute``: True (every layer) or a list of layer counts per pipeline stage: those layers keep no
  activations and run their forward again in backward (``torch.utils.checkpoint``).
- ``select_recompute``: True (MindFormers' default patterns ``feed_forward\\.mul`` and
  ``feed_forward\\.w1\\.activation\\.silu``), a list of layer counts per stage (default patterns), a list of
  patterns (every layer), or ``{pattern: True | [counts per stage]}``. A pattern is a dotted path of regular
  expressions: its first part names a sub-module of the layer (``attention``, ``feed_forward``,
  ``attention_norm``, ``ffn_norm``: mftune keeps MindFormers' names), its last part an operator
  (``mul``, ``silu``, ``softmax``, ...). In torch the sub-module runs under selective activation
  checkpointing: the outputs of those operators are recomputed in backward, everything else is saved;
  a pattern that ends at a sub-module recomputes all of it. A layer with full recompute ignores its
  select patterns (as in MindFormers). ``select_recompute_exclude`` takes patterns/layers out again.

"Layer counts per stage" count from the first layer of each pipeline stage (stages split the layers
evenly, ``num_layers // stages`` each, plus ``model_config.offset``); mftune runs pipeline stages as data
parallel (docs/parallel.md) but honours which layers MindFormers would recompute.

Each layer's (or sub-module's) forward is wrapped on the instance, so parameter names (and therefore
checkpoints) are unchanged; hooks that other wrappers (FSDP2) register on the module still run.
"""
from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

logger = logging.getLogger("mftune")

aten = torch.ops.aten
DEFAULT_PATTERNS = (r"feed_forward\.mul", r"feed_forward\.w1\.activation\.silu")
SUBMODULES = ("attention", "feed_forward", "attention_norm", "ffn_norm")
CHILDREN = {"attention": ("wq", "wk", "wv", "wo"), "feed_forward": ("w1", "w2", "w3", "activation"),
            "attention_norm": (), "ffn_norm": ()}  # MindFormers' cells inside each sub-module
# MindFormers' operator attribute names in a Llama layer -> the aten ops that compute them here.
# Views (reshape, transpose) store nothing, so recomputing them changes nothing.
OPS: dict[str, tuple] = {
    "mul": (aten.mul.Tensor,), "silu": (aten.silu.default,), "softmax": (aten._softmax.default,),
    "add": (aten.add.Tensor,), "sub": (aten.sub.Tensor,), "div": (aten.div.Tensor,),
    "cast": (aten._to_copy.default,), "rsqrt": (aten.rsqrt.default,), "square": (aten.pow.Tensor_Scalar,),
    "mean": (aten.mean.dim,), "matmul": (aten.mm.default, aten.addmm.default),
    "batch_matmul": (aten.bmm.default,), "reshape": (), "transpose": (),
}


@dataclass
class LayerRecompute:
    """What one decoder layer recomputes: all of it, or per sub-module the MindFormers operators
    (``None`` = the whole sub-module)."""

    full: bool = False
    select: dict[str, set[str] | None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.full or bool(self.select)


def stage_sizes(num_layers: int, stages: int, offset: Any = 0) -> list[int]:
    """Layers per pipeline stage: ``num_layers // stages`` each plus ``offset`` (an int for every stage or
    one per stage; mftune.config.checks checks it as MindFormers does)."""
    base = num_layers // stages
    extra = list(offset) if isinstance(offset, (list, tuple)) else [int(offset or 0)] * stages
    sizes = [base + int(e) for e in extra]
    sizes[-1] += num_layers - sum(sizes)
    return sizes


def chosen_layers(value: Any, sizes: Sequence[int]) -> set[int]:
    """The layers a bool / per-stage count list / pattern list selects (first ``n`` of each stage)."""
    if isinstance(value, bool):
        return set(range(sum(sizes))) if value else set()
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return set(range(sum(sizes)))
    counts = [min(sizes[i], sizes[i] if v is True else int(v)) for i, v in enumerate(value)]
    start = [sum(sizes[:i]) for i in range(len(sizes))]
    return {start[i] + k for i, n in enumerate(counts) for k in range(n)}


def _patterns(value: Any) -> dict[str, Any]:
    """``{pattern: layer selection}`` of a select_recompute value (MindFormers' _format_recompute_dict)."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return {p: True for p in value}
    return {p: value for p in DEFAULT_PATTERNS}


def pattern_target(pattern: str) -> tuple[list[str], set[str] | None]:
    """The sub-modules a pattern names and its operators (None: the whole sub-module). Split on ``\\.``
    as MindFormers does; a last part naming neither an operator nor a module of the layer matches
    nothing (MindFormers recomputes nothing for it either)."""
    parts = pattern.split(r"\.")
    subs = [s for s in SUBMODULES if re.fullmatch(parts[0], s)]
    if len(parts) == 1:
        return subs, None
    ops = {op for op in OPS if re.fullmatch(parts[-1], op)}
    if ops:
        return subs, ops
    # a path ending at a module (feed_forward\.w1): all of the sub-module, coarser than MindFormers
    return ([s for s in subs if any(re.fullmatch(parts[-1], m) for m in CHILDREN[s])], None)


def plan(recompute: Any, select: Any, exclude: Any, num_layers: int, offset: Any = 0) -> list[LayerRecompute]:
    """Per layer, what ``recompute_config`` recomputes (see the module docstring)."""
    lists = (recompute, select, exclude, *_patterns(select).values(), *(_patterns(exclude).values() if exclude else ()))
    stages = next((len(v) for v in lists if isinstance(v, (list, tuple)) and v and not isinstance(v[0], str)), 1)
    sizes = stage_sizes(num_layers, stages, offset)
    full = chosen_layers(recompute, sizes)
    layers = [LayerRecompute(full=i in full) for i in range(num_layers)]
    if select is not False and select is not None:
        for pattern, chosen in _patterns(select).items():
            subs, ops = pattern_target(pattern)
            if not subs:
                logger.warning("recompute_config.select_recompute: pattern %r names no operator of a sub-module "
                               "of a layer (%s); it recomputes nothing", pattern, ", ".join(SUBMODULES))
            for i in chosen_layers(chosen, sizes):
                for sub in subs:
                    _add(layers[i].select, sub, ops)
    if exclude:
        for pattern, chosen in _patterns(exclude).items():
            subs, ops = pattern_target(pattern)
            for i in chosen_layers(chosen, sizes):
                for sub in subs:
                    _remove(layers[i].select, sub, ops)
    return layers


def _add(select: dict[str, set[str] | None], sub: str, ops: set[str] | None) -> None:
    if ops is None or select.get(sub, set()) is None:
        select[sub] = None
    else:
        select[sub] = select.get(sub, set()) | ops


def _remove(select: dict[str, set[str] | None], sub: str, ops: set[str] | None) -> None:
    if sub not in select:
        return
    if ops is None or select[sub] is None:
        select.pop(sub)
    else:
        select[sub] = select[sub] - ops
        if not select[sub]:
            select.pop(sub)


def _policy(ops: set[str]):
    recompute = {op for name in ops for op in OPS[name]}

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.PREFER_RECOMPUTE if op in recompute else CheckpointPolicy.MUST_SAVE
    return policy


def _wrap(module: nn.Module, ops: set[str] | None) -> None:
    if getattr(module, "_mftune_recompute", False):
        return
    if ops is None:
        module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False)
    else:
        context_fn = functools.partial(create_selective_checkpoint_contexts, _policy(ops))
        module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False, context_fn=context_fn)
    module._mftune_recompute = True


def apply_recompute(layers: nn.ModuleList, layer_plan: Sequence[LayerRecompute] | None = None) -> str:
    """Wrap each layer (or its sub-modules) as ``layer_plan`` says (default: every layer in full);
    returns a one-line summary for the log."""
    layer_plan = layer_plan or [LayerRecompute(full=True)] * len(layers)
    full, select = [], []
    for i, (layer, what) in enumerate(zip(layers, layer_plan)):
        if what.full:
            _wrap(layer, None)
            full.append(i)
        elif what.select:
            for sub, ops in what.select.items():
                _wrap(getattr(layer, sub), ops)
            select.append(i)
    parts = [f"full recompute of {len(full)} decoder layer(s)" + (f" {_ranges(full)}" if full else "")]
    if select:
        ops = sorted({f"{s}.{o}" if o else s for w in layer_plan if not w.full
                      for s, names in w.select.items() for o in (sorted(names) if names else [""])})
        parts.append(f"selective recompute of {', '.join(ops)} in {len(select)} layer(s) {_ranges(select)}")
    return "; ".join(parts)


def _ranges(ids: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``layers 0-2, 5``."""
    out, start = [], None
    for k, i in enumerate(ids):
        if start is None:
            start = i
        if k + 1 == len(ids) or ids[k + 1] != i + 1:
            out.append(f"{start}-{i}" if i != start else f"{i}")
            start = None
    return "(layers " + ", ".join(out) + ")"
