"""Multi-adapter LoRA serving (MindFormers' S-LoRA, ``pet_type: slora``): several LoRA adapters over one base, each
row of a batch decoded with its own.

MindFormers' ``SLoraLinear`` (``mindformers/pet/tuners/slora_adapter.py``): each adapted Linear holds every adapter's
factors stacked, ``[n + 1, r, in]`` and ``[n + 1, out, r]`` (``r`` the largest rank, smaller ones zero-padded; slot 0
zeros: no adapter), and a row with adapter ``k`` adds ``B[k] A[k] x``. The adapters come from the PEFT directories an
``adapter_path`` JSON names (``{"name": "dir", ...}``; slot ``k`` is the ``k``-th name), read by
``mftune.checkpoint.slora_adapters``. Unlike MindFormers, which scales every adapter by the first one's
``lora_alpha`` over the largest rank, each adapter keeps its own scaling (folded into its B), so a row's output is
the one its adapter gives alone. Prediction only: nothing here trains.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from mftune.models.llama import Fill, fill_in_place

SLORA_A, SLORA_B = "mindpet_delta_slora_a", "mindpet_delta_slora_b"  # [n + 1, r, in], [n + 1, out, r]


@dataclass
class SLoraConfig:
    """``pet_config`` with ``pet_type: slora`` (MindFormers' predict_llama2_7b_slora.yaml has only these keys: its
    SLoraConfig's others are read from the adapters)."""

    pet_type: str = "slora"
    adapter_path: str = ""  # a JSON file {"adapter name": "PEFT adapter directory", ...}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def slora_config_errors(pet_config: dict[str, Any], err) -> list[str]:
    errors = [err(k, "unknown pet_config key for pet_type slora", "Valid keys: pet_type, adapter_path (the adapters' "
                  "ranks, alphas and targets come from their own adapter_config.json).")
              for k in pet_config if k not in SLoraConfig.field_names()]
    v = pet_config.get("adapter_path")
    if not isinstance(v, str) or not v:
        errors.append(err("adapter_path", "S-LoRA needs the JSON file naming its adapters",
                          'Set adapter_path: a JSON file {"name": "PEFT adapter directory", ...}.'))
    return errors


class AdapterIds:
    """The adapter slot of each row of the next forwards (``set_adapter_ids``), shared by every ``SLoRALinear``."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.ids: torch.Tensor | None = None


class SLoRALinear(nn.Module):
    """An ``nn.Linear`` plus the stacked adapters of S-LoRA: ``y = x W^T + b + B[k] A[k] x`` for a row of adapter
    ``k`` (slot 0: zeros). ``weight``/``bias`` are the wrapped Linear's own Parameters; the stacks are frozen."""

    def __init__(self, base: nn.Linear, num_adapters: int, rank: int, ids: AdapterIds,
                 base_init_std: float | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        self.base_init_std = base_init_std
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        device, dtype = base.weight.device, base.weight.dtype  # the base's dtype: many adapters, small memory
        self.mindpet_delta_slora_a = nn.Parameter(torch.zeros(num_adapters + 1, rank, self.in_features, device=device,
                                                              dtype=dtype), requires_grad=False)
        self.mindpet_delta_slora_b = nn.Parameter(torch.zeros(num_adapters + 1, self.out_features, rank,
                                                              device=device, dtype=dtype), requires_grad=False)
        self.__dict__["ids"] = ids  # shared, not a module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.ids.ids
        if ids is None or ids.shape[0] != x.shape[0]:
            raise RuntimeError(f"S-LoRA: set_adapter_ids(model, ids) with one id per row before the forward (got "
                               f"{None if ids is None else ids.shape[0]} ids for {x.shape[0]} rows)")
        if isinstance(self.weight, DTensor):  # tensor parallel: this rank's block, as the layout says
            return self._forward_sharded(x, ids)
        return self._forward(x, self.weight, self.bias, self.mindpet_delta_slora_a, self.mindpet_delta_slora_b, ids)

    @staticmethod
    def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stack_a: torch.Tensor,
                 stack_b: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, weight, bias)  # (bs, seqlen, out)
        a = stack_a[ids].to(x.dtype)  # (bs, r, in)
        b = stack_b[ids].to(x.dtype)  # (bs, out, r)
        delta = torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))  # (bs, seqlen, out)
        return out + delta.to(out.dtype)

    def _forward_sharded(self, x: torch.Tensor, ids: torch.Tensor) -> DTensor:
        """Column-parallel (W, B split over out): this rank's output columns. Row-parallel (W, A split over in):
        partial sums, which the layout's output step adds; the product stays linear in each part."""
        weight = self.weight
        if self.bias is not None:
            raise NotImplementedError("S-LoRA under tensor parallel supports Linear layers without bias (Llama's)")
        local = [t.to_local() if isinstance(t, DTensor) else t
                 for t in (x, weight, self.mindpet_delta_slora_a, self.mindpet_delta_slora_b)]
        out = self._forward(local[0], local[1], None, local[2], local[3], ids)
        placement = Shard(out.ndim - 1) if weight.placements[-1].is_shard(0) else \
            (Partial() if weight.placements[-1].is_shard(1) else Replicate())
        return DTensor.from_local(out, weight.device_mesh, (placement,), run_check=False)

    @torch.no_grad()
    def init_weights(self, fill: Fill | None = None) -> None:
        """The base weight as the model draws it (``N(0, base_init_std)``, else nn.Linear's), the stacks zeros."""
        fill = fill or fill_in_place
        if self.base_init_std is not None:
            fill(self.weight, functools.partial(nn.init.normal_, mean=0.0, std=self.base_init_std))
        else:
            fill(self.weight, functools.partial(nn.init.kaiming_uniform_, a=math.sqrt(5)))
        if self.bias is not None:
            fill(self.bias, nn.init.zeros_)
        fill(self.mindpet_delta_slora_a, nn.init.zeros_)
        fill(self.mindpet_delta_slora_b, nn.init.zeros_)


def apply_slora(model: nn.Module, names: list[str], rank: int, modules: list[str]) -> nn.Module:
    """Wrap each Linear of ``modules`` (dotted names) in an ``SLoRALinear`` with slots for ``names``'s adapters of
    rank up to ``rank``, and freeze the model."""
    if slora_ids(model) is not None:
        raise ValueError("S-LoRA is already applied to this model; apply get_pet_model once")
    ids = AdapterIds(list(names))
    init_std = getattr(getattr(model, "config", None), "initializer_range", None)
    for module in modules:
        parent_name, _, leaf = module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, SLoRALinear(getattr(parent, leaf), len(names), rank, ids, init_std))
    for param in model.parameters():
        param.requires_grad_(False)
    model.__dict__["slora_ids"] = ids
    return model


def slora_ids(model: nn.Module) -> AdapterIds | None:
    return model.__dict__.get("slora_ids")


def set_adapter_ids(model: nn.Module, ids: list[int] | torch.Tensor) -> None:
    """The adapter slot of each row of the next forwards (0: the base alone; ``k``: the ``k``-th adapter)."""
    holder = slora_ids(model)
    if holder is None:
        raise ValueError("set_adapter_ids: the model has no S-LoRA adapters (pet_type slora)")
    device = next(model.parameters()).device
    holder.ids = torch.as_tensor(ids, dtype=torch.long, device=device)


@torch.no_grad()
def fill_adapters(model: nn.Module, adapters: list[tuple[dict[str, torch.Tensor], float]],
                  fill: Fill | None = None) -> list[list[str]]:
    """Put the adapters in slots 1..n in order, each ``(tensors under mftune LoRA names
    (<module>.mindpet_delta_lora_a / _b), scaling)``, the scaling folded into B; returns the modules each adapts.
    ``fill`` as in ``init_weights`` (sharded models: each stack is built whole on the CPU, then placed)."""
    fill = fill or fill_in_place
    adapted: list[list[str]] = [[] for _ in adapters]
    for name, module in model.named_modules():
        if not isinstance(module, SLoRALinear):
            continue
        stack_a = torch.zeros(module.mindpet_delta_slora_a.shape)
        stack_b = torch.zeros(module.mindpet_delta_slora_b.shape)
        for slot, (tensors, scaling) in enumerate(adapters, start=1):
            if f"{name}.mindpet_delta_lora_a" in tensors:
                a, b = tensors[f"{name}.mindpet_delta_lora_a"], tensors[f"{name}.mindpet_delta_lora_b"]
                stack_a[slot, :a.shape[0]] = a.float()
                stack_b[slot, :, :a.shape[0]] = b.float() * scaling
                adapted[slot - 1].append(name)
        fill(module.mindpet_delta_slora_a, lambda t, v=stack_a: t.copy_(v.to(t.device, t.dtype)))
        fill(module.mindpet_delta_slora_b, lambda t, v=stack_b: t.copy_(v.to(t.device, t.dtype)))
    return adapted
