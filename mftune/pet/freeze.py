"""MindPet's ``freeze_delta``: which parameters a PET method trains, shared by LoRA and the prefix methods."""
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
