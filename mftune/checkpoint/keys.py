"""Names inside a checkpoint besides the model's parameters, and how to tell them apart.

A checkpoint file may hold, next to model tensors (MindFormers names, ``mftune.checkpoint.names``):
PET parameters (``PET_MARK``; LoRA factors contain ``LORA_MARK``, defined with the LoRA layer in ``mftune.pet.lora``),
AdamW moments of a trainable parameter (``adam_m.<name>``, ``adam_v.<name>``), MindFormers' scalar
counters (``epoch_num``, ``step_num``, ...) and per-rank RNG states.
"""
from __future__ import annotations

import re

from mftune.pet.dora import LORA_M
from mftune.pet.lora import LORA_A, LORA_B, LORA_MARK

__all__ = ["LORA_A", "LORA_B", "LORA_M", "LORA_MARK", "OPTIMIZER_PREFIXES", "PER_RANK_KEYS", "PET_MARK",
           "SCALAR_KEYS", "is_init_factor", "is_lora", "is_pet", "is_prefix_index", "is_prefix_param", "is_training_state",
           "moment_names", "parameter_of"]

PET_MARK = "mindpet_delta"  # in the name of every PET parameter: LoRA factors, a prefix encoder's (MindPet's)

OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.")  # AdamW exp_avg, exp_avg_sq of the parameter named after the dot
PER_RANK_KEYS = ("rng_state", "cuda_rng_state")  # belong to the saving rank of the saving layout
SCALAR_KEYS = ("epoch_num", "step_num", "global_step", "loss_scale", "global_batch_size",
               "consumed_samples", "optimizer_step", "loss_scale_good_steps", *PER_RANK_KEYS)


def is_lora(name: str) -> bool:
    """Whether ``name`` is a LoRA factor (or an optimizer moment of one)."""
    return LORA_MARK in name


def is_pet(name: str) -> bool:
    """Whether ``name`` is a PET method's parameter (LoRA, prefix tuning, P-tuning v2) or an optimizer moment of one:
    what a checkpoint of trained tensors holds besides modules_to_save, and what a base never does."""
    return PET_MARK in name


def is_init_factor(name: str) -> bool:
    """PiSSA / OLoRA's frozen A0 / B0 (``mftune.pet.init``): derived from the base whenever it is loaded."""
    return name.endswith((".mindpet_delta_init_a", ".mindpet_delta_init_b"))


def is_prefix_param(name: str) -> bool:
    """A prefix encoder's parameter (prefix tuning / P-tuning v2: ``mindpet_delta_<type>_embedding...``,
    ``..._trans...``)."""
    return re.match(r"mindpet_delta_(prefixtuning|ptuning2)_(embedding|trans)\.", name) is not None


def is_prefix_index(name: str) -> bool:
    """MindFormers' ``mindpet_delta_<prefixtuning|ptuning2>_prefix``: ``arange(P)``, an index buffer its prefix
    checkpoints hold; not a parameter (mftune's prefix encoder has none)."""
    return re.fullmatch(r"mindpet_delta_(prefixtuning|ptuning2)_prefix", name) is not None


def is_training_state(name: str) -> bool:
    """Optimizer moments and counters: what resuming restores, never weights of the model."""
    return name.startswith(OPTIMIZER_PREFIXES) or name in SCALAR_KEYS


def moment_names(name: str) -> tuple[str, str]:
    """``(adam_m.<name>, adam_v.<name>)``: where a parameter's AdamW moments are stored."""
    return tuple(f"{prefix}{name}" for prefix in OPTIMIZER_PREFIXES)  # type: ignore[return-value]


def parameter_of(name: str) -> str:
    """The parameter an optimizer moment belongs to (``adam_m.x`` -> ``x``); other names unchanged."""
    return next((name[len(p):] for p in OPTIMIZER_PREFIXES if name.startswith(p)), name)
