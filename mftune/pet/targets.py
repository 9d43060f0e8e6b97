"""Which Linear layers LoRA adapts: MindFormers' search by local attribute name under the backbone, and lm_head.

MindFormers' ``LoraModel.add_adapter`` / MindPet's ``recursive_replace_dense_cell`` (reference/mindformers.md §6.3):
the children of the first of ``backbone``/``model``/``transformer``/``llm_model`` are visited recursively; a child whose
local name ``re.match``es an exclude pattern is skipped; one matching a target is taken when it is an ``nn.Linear``
(and never recursed into); any other child is searched the same way. ``lm_head`` lies outside the backbone: mftune
adapts it only when a pattern names it (PEFT allows LoRA there; MindFormers never looks).
"""
from __future__ import annotations

import re

from torch import nn

from mftune.pet.config import LoraConfig

BACKBONE_ATTRS = ("backbone", "model", "transformer", "llm_model")  # MindFormers LoraModel.add_adapter order
HEAD = "lm_head"  # outside the backbone: adapted only when target_modules names it


def backbone(model: nn.Module) -> tuple[nn.Module, str]:
    """The first of backbone/model/transformer/llm_model (MindFormers' order); the model itself if none."""
    for attr in BACKBONE_ATTRS:
        child = getattr(model, attr, None)
        if isinstance(child, nn.Module):
            return child, attr
    return model, ""


def head_target(model: nn.Module, root: nn.Module, targets: list[re.Pattern],
                excludes: list[re.Pattern]) -> bool:
    """Whether ``target_modules`` puts LoRA on the model's ``lm_head`` (outside the backbone MindFormers searches):
    only a pattern that names it (``'.*wq|.*wv|lm_head'``), so that MindFormers' broad patterns (``'.*'``) keep
    meaning the backbone alone."""
    head = getattr(model, HEAD, None)
    return (isinstance(head, nn.Linear) and root is not model and not any(p.match(HEAD) for p in excludes)
            and any(HEAD in p.pattern and p.match(HEAD) for p in targets))


def find_targets(module: nn.Module, prefix: str, targets: list[re.Pattern], excludes: list[re.Pattern]):
    """``(parent, local name, nn.Linear, dotted name)`` of every layer LoRA replaces, in module order: a child
    whose local name matches an exclude is not visited, one matching a target is taken if it is an
    ``nn.Linear`` (and never recursed into), any other child is searched the same way."""
    for name, child in list(module.named_children()):
        full = f"{prefix}.{name}" if prefix else name
        if child is None or any(p.match(name) for p in excludes):
            continue
        if any(p.match(name) for p in targets):
            if isinstance(child, nn.Linear):  # a matching non-Linear is skipped and not recursed into
                yield module, name, child, full
        else:
            yield from find_targets(child, full, targets, excludes)


def lora_targets(model: nn.Module, pet_config: dict | LoraConfig) -> list[str]:
    """The dotted names of the ``nn.Linear`` layers ``get_pet_model(model, pet_config)`` would replace,
    nothing changed (e.g. ``model.layers.0.attention.wq``); works on a meta-device model."""
    config = pet_config if isinstance(pet_config, LoraConfig) else LoraConfig.from_dict(dict(pet_config))
    root, root_name = backbone(model)
    targets = [re.compile(p) for p in config.target_patterns]
    excludes = [re.compile(p) for p in config.exclude_patterns]
    head = [HEAD] if head_target(model, root, targets, excludes) else []
    return [full for _, _, _, full in find_targets(root, root_name, targets, excludes)] + head


def no_match_message(root: nn.Module, root_name: str, config: LoraConfig) -> str:
    linears = [n for n, m in root.named_modules() if isinstance(m, nn.Linear)]
    local = sorted({n.rsplit(".", 1)[-1] for n in linears})
    where = f"under '{root_name}'" if root_name else "in the model"
    example = f" (e.g. {root_name + '.' if root_name else ''}{linears[0]})" if linears else ""
    return (f"pet_config.target_modules={config.target_modules!r} (exclude_layers={config.exclude_layers!r}) "
            f"matched no nn.Linear {where}. Patterns are re.match'ed against each module's local attribute "
            f"name{example}; the Linear layers there are named: {', '.join(local) or 'none'} "
            f"({len(linears)} layers). Use e.g. '.*wq|.*wk|.*wv|.*wo'.")
