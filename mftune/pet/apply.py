"""``get_pet_model``: apply the PET method a ``pet_config`` names (MindFormers' ``get_pet_model``)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mftune.models.llama import Fill
from mftune.pet.config import LoraConfig, pet_config_from_dict
from mftune.pet.lora import apply_lora, init_lora_weights
from mftune.pet.prefix import apply_prefix, init_prefix_weights
from mftune.pet.prefix_config import PrefixConfig
from mftune.pet.slora import SLoraConfig


def get_pet_model(model: nn.Module, pet_config: dict[str, Any] | LoraConfig | PrefixConfig | SLoraConfig) -> nn.Module:
    """Apply ``pet_config``'s method to ``model`` in place (any device, meta included) and return it: LoRA
    (``mftune.pet.lora``), or prefix tuning / P-tuning v2 (``mftune.pet.prefix``). Then call
    ``init_pet_weights`` after ``to_empty`` to give the new parameters their initial values."""
    config = pet_config_from_dict(pet_config)
    if isinstance(config, SLoraConfig):  # its layers and ranks come from the adapters' files
        raise ValueError("pet_type slora is applied from its adapters: mftune.checkpoint.slora_adapters.apply(model, "
                         "adapter_path), then .load(...) after the base weights")
    if isinstance(config, PrefixConfig):
        return apply_prefix(model, config)
    return apply_lora(model, config)


@torch.no_grad()
def init_pet_weights(model: nn.Module, fill: Fill | None = None) -> nn.Module:
    """Re-draw every PET parameter (LoRA's A and B, a prefix encoder's): after ``to_empty`` of a meta-built model,
    before a checkpoint fills what it holds. ``fill`` as in ``LlamaForCausalLM.init_weights``."""
    init_lora_weights(model, fill)
    init_prefix_weights(model, fill)
    return model
