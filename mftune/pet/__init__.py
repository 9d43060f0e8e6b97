"""Parameter-efficient tuning (MindFormers ``mindformers.pet``): LoRA and its variants (rsLoRA, DoRA, LoRA+, PiSSA,
OLoRA), prefix tuning and P-tuning v2, and multi-adapter S-LoRA serving.

``get_pet_model(model, pet_config)`` applies it in place between build and parallelize.
"""
from mftune.pet.apply import get_pet_model, init_pet_weights
from mftune.pet.config import LoraConfig, pet_config_errors, pet_config_from_dict
from mftune.pet.lora import (
    LORA_MARK,
    LoRALinear,
    freeze_lora,
    init_base_factors,
    init_dora_magnitudes,
    init_from_weights,
    init_lora_weights,
    lora_delta_weight,
    lora_layers,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)
from mftune.pet.freeze import count_parameters, trainable_summary
from mftune.pet.prefix import PrefixEncoder, prefix_encoder, prefix_modules
from mftune.pet.prefix_config import PrefixConfig, is_prefix_type
from mftune.pet.targets import lora_targets

__all__ = [
    "LORA_MARK", "LoRALinear", "LoraConfig", "PrefixConfig", "PrefixEncoder", "count_parameters", "freeze_lora",
    "get_pet_model", "init_base_factors", "init_dora_magnitudes", "init_from_weights", "init_lora_weights",
    "init_pet_weights", "is_prefix_type", "lora_delta_weight", "lora_layers", "lora_state_dict", "lora_targets",
    "merge_lora", "pet_config_errors", "pet_config_from_dict", "prefix_encoder", "prefix_modules", "trainable_summary",
    "unmerge_lora",
]
