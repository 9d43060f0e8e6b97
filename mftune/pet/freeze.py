"""Which parameters a PET method trains: MindPet's ``freeze_delta`` (shared by LoRA and the prefix methods), PEFT's
``modules_to_save`` and the trainable-parameter summary."""
from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn


def freeze_params(model: nn.Module, trains: Callable[[str], bool], freeze_include: list[str] | str | None = None,
                  freeze_exclude: list[str] | str | None = None) -> None:
    """Train exactly the parameters whose full name ``trains`` accepts (the method's own); then a parameter whose
    name matches a ``freeze_include`` pattern (fnmatch) and no ``freeze_exclude`` pattern is frozen, one matching
    only ``freeze_exclude`` is made trainable, one matching both is left as it is (MindPet's ``freeze_modules``)."""
    include = [freeze_include] if isinstance(freeze_include, str) else list(freeze_include or [])
    exclude = [freeze_exclude] if isinstance(freeze_exclude, str) else list(freeze_exclude or [])
    for name, param in model.named_parameters():
        param.requires_grad_(trains(name))
        inc = any(fnmatch.fnmatchcase(name, p) for p in include)
        exc = any(fnmatch.fnmatchcase(name, p) for p in exclude)
        if inc and not exc:
            param.requires_grad_(False)
        elif exc and not inc:
            param.requires_grad_(True)


def saved_modules(model: nn.Module, names: list[str]) -> list[str]:
    """The modules ``modules_to_save`` names (a module whose dotted name is an item or ends with ``.<item>``;
    peft matches any string suffix), trained in full beside the adapters. An item naming no module is a
    ValueError, as is one naming a tied embedding or lm_head (PEFT would train separate copies of the two)."""
    modules = [n for n, _ in model.named_modules() if n]
    found = []
    for item in names:
        hits = [n for n in modules if n == item or n.endswith(f".{item}")]
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in modules if not n.split(".")[-1].isdigit()})
            raise ValueError(f"pet_config.modules_to_save={names!r} is invalid: {item!r} names no module of the "
                             f"model. Use module names or their last part: {', '.join(leaves)}.")
        found += [h for h in hits if h not in found]
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and any(h in ("lm_head", "model.tok_embeddings") for h in found):
        raise ValueError(f"pet_config.modules_to_save={names!r} is invalid with tie_word_embeddings: the embedding "
                         f"and lm_head are one tensor. Train it with freeze_exclude instead, or untie them.")
    return found


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, all)`` as PEFT's ``get_nb_trainable_parameters`` (shared parameters counted once)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """PEFT's ``print_trainable_parameters`` line, e.g.
    ``trainable params: 16,777,216 || all params: 6,755,192,832 || trainable%: 0.2484``."""
    trainable, total = count_parameters(model)
    percent = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"
