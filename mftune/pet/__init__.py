"""Parameter-efficient tuning (MindFormers ``mindformers.pet``): LoRA and its variants (rsLoRA, DoRA, LoRA+).

``get_pet_model(model, pet_config)`` applies it in place between build and parallelize.
"""
from mftune.pet.config import LoraConfig, pet_config_errors
from mftune.pet.lora import (
    LORA_MARK,
    LoRALinear,
    count_parameters,
    freeze_lora,
    get_pet_model,
    init_dora_magnitudes,
    init_lora_weights,
    lora_delta_weight,
    lora_layers,
    lora_targets,
    lora_state_dict,
    merge_lora,
    trainable_summary,
    unmerge_lora,
)

__all__ = [
    "LORA_MARK", "LoRALinear", "LoraConfig", "count_parameters", "freeze_lora", "get_pet_model",
    "init_dora_magnitudes", "init_lora_weights", "lora_delta_weight", "lora_layers", "lora_state_dict",
    "lora_targets", "merge_lora", "pet_config_errors", "trainable_summary", "unmerge_lora",
]
