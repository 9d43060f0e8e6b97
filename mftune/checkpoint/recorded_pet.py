"""The pet_config of a run whose ``load_checkpoint`` (or resume point) is an mftune checkpoint holding PET weights
(LoRA, or a prefix method's): the one its header records, over the run's.

LoRA factors mean what they were trained with: ``lora_rank`` (their shape), ``lora_alpha`` and ``use_rslora``
(the scaling alpha / rank or alpha / sqrt(rank)), ``use_dora`` (a magnitude per row), ``modules_to_save`` (whole
modules trained with them), ``init_lora_weights`` (PiSSA / OLoRA subtract factors of the base) and the layers
``target_modules`` / ``exclude_layers`` select. A run that loads them with another alpha gives other outputs
without any error, and one that selects other layers trains fresh adapters beside them or leaves some out; so, as
for a PEFT adapter (``mftune.checkpoint.adapter_config``), the checkpoint's values win over the run's pet_config,
each difference a WARNING naming both, and the run's own checkpoints record what was applied. Training settings
(``lora_dropout``, dtypes, ``freeze_include`` / ``freeze_exclude``, ``lora_plus_lr_ratio``) stay the run's: a run
may continue an adapter with another dropout. A prefix checkpoint brings its method and the keys that shape its
prefix (``_prefix_pet_config``). A checkpoint without PET tensors (a base, a merged model) or without a recorded
pet_config leaves the run's pet_config as it is.
"""
from __future__ import annotations

import logging
from typing import Any

from torch import nn

from mftune.checkpoint.formats import checkpoint_header, open_checkpoint
from mftune.checkpoint.keys import is_lora, is_pet
from mftune.pet import LoraConfig, PrefixConfig, is_prefix_type, lora_targets
from mftune.pet.prefix_config import training_keys

logger = logging.getLogger("mftune")

KEY_PREFIX = "model.model_config.pet_config"
# besides the selected layers: what the factors were trained with
MEANING = ("lora_rank", "lora_alpha", "use_rslora", "use_dora", "modules_to_save", "init_lora_weights")
SELECTION = ("target_modules", "exclude_layers")


def checkpoint_pet_config(run_pet_config: dict | None, path: str, model: nn.Module, run_mode: str,
                          lora_names: list[str] | None = None) -> dict | None:
    """The pet_config to apply when the mftune checkpoint ``path`` is loaded into ``model`` (plain, e.g. on
    meta): its recorded LoRA values over ``run_pet_config`` (module doc). ``lora_names``: the checkpoint's
    tensor names when the caller has them (a resume point), else they are read from its headers."""
    recorded = recorded_pet_config(path)
    if recorded and is_prefix_type(recorded.get("pet_type")):
        names = lora_names if lora_names is not None else list(open_checkpoint(path))
        return _prefix_pet_config(run_pet_config, recorded, names, path, run_mode)
    if not recorded or str(recorded.get("pet_type", "lora")).lower() != "lora":
        return run_pet_config
    names = lora_names if lora_names is not None else list(open_checkpoint(path))
    if not any(is_lora(n) for n in names):
        return run_pet_config
    if run_pet_config and is_prefix_type(run_pet_config.get("pet_type")):
        logger.warning("%s.pet_type=%s is replaced by lora, which load_checkpoint=%s was trained with (%s)",
                       KEY_PREFIX, run_pet_config["pet_type"], path, describe(recorded))
        run_pet_config = None
    if not run_pet_config:
        log = logger.warning if run_mode in ("train", "finetune") else logger.info
        log("%s is empty and load_checkpoint=%s holds LoRA adapters: the pet_config it records is applied (%s)%s",
            KEY_PREFIX, path, describe(recorded), ", so only the adapters train" if run_mode in ("train", "finetune")
            else "")
        return {k: v for k, v in recorded.items() if k in LoraConfig.field_names()}
    effective = dict(run_pet_config)
    run = LoraConfig(**{k: v for k, v in run_pet_config.items() if k in LoraConfig.field_names()})
    for key in MEANING:
        theirs = recorded.get(key, getattr(LoraConfig, key))
        if getattr(run, key) != theirs:
            logger.warning("%s.%s=%s (%s) is replaced by %s=%s, which load_checkpoint=%s was trained with", KEY_PREFIX,
                           key, getattr(run, key), source(run_pet_config, key), key, theirs, path)
            effective[key] = theirs
    ours, theirs = lora_targets(model, run_pet_config), lora_targets(model, recorded)
    if ours != theirs:
        effective.update({k: recorded.get(k) for k in SELECTION})
        logger.warning("%s (%s) is replaced by the checkpoint's target_modules=%r%s (%s): LoRA on %d layers (%s) "
                       "instead of %d", yaml_targets(run_pet_config), source(run_pet_config, "target_modules"),
                       recorded.get("target_modules"), _excluding(recorded), path, len(theirs), first(theirs),
                       len(ours))
    return effective


def _prefix_pet_config(run_pet_config: dict | None, recorded: dict, names: list[str], path: str,
                       run_mode: str) -> dict | None:
    """A prefix method's checkpoint: its method and the keys that shape or compute its prefix win over the run's
    (the count of tokens, the projection and its size, compute_dtype), each difference a WARNING; dropout and
    freezing stay the run's."""
    if not any(is_pet(n) for n in names):
        return run_pet_config
    mine = {k: v for k, v in recorded.items() if k in PrefixConfig.field_names(recorded["pet_type"])}
    if not run_pet_config:
        log = logger.warning if run_mode in ("train", "finetune") else logger.info
        log("%s is empty and load_checkpoint=%s holds a %s prefix: the pet_config it records is applied (%s)",
            KEY_PREFIX, path, recorded["pet_type"], mine)
        return mine
    if str(run_pet_config.get("pet_type", "lora")).lower() != str(recorded["pet_type"]).lower():
        kept = training_keys(run_pet_config, recorded["pet_type"])
        logger.warning("%s.pet_type=%s is replaced by %s, which load_checkpoint=%s was trained with (%s; the run's %s "
                       "kept)", KEY_PREFIX, run_pet_config.get("pet_type", "lora"), recorded["pet_type"], path, mine,
                       kept or "nothing")
        return {**mine, **kept}
    run, theirs = PrefixConfig.from_dict(dict(run_pet_config)), PrefixConfig(**mine)
    effective = dict(run_pet_config)
    for key in run.field_names(run.pet_type):
        if key in ("pet_type", "freeze_include", "freeze_exclude") or "dropout" in key:
            continue
        if getattr(run, key) != getattr(theirs, key):
            logger.warning("%s.%s=%s (%s) is replaced by %s=%s, which load_checkpoint=%s was trained with", KEY_PREFIX,
                           key, getattr(run, key), source(run_pet_config, key), key, getattr(theirs, key), path)
            effective[key] = getattr(theirs, key)
    return effective


def recorded_pet_config(path: str) -> dict[str, Any] | None:
    """The pet_config an mftune checkpoint's header records (None when it records none)."""
    header = checkpoint_header(path)
    recorded = header.get("pet_config") or (header.get("model_config") or {}).get("pet_config")
    return recorded if isinstance(recorded, dict) else None


def source(run_pet_config: dict, key: str) -> str:
    return "YAML" if key in run_pet_config else "default"


def yaml_targets(run_pet_config: dict) -> str:
    return f"{KEY_PREFIX}.target_modules={run_pet_config.get('target_modules')!r}{_excluding(run_pet_config)}"


def _excluding(pet_config: dict) -> str:
    exclude = pet_config.get("exclude_layers")
    return f" with exclude_layers={exclude!r}" if exclude is not None else ""


def first(modules: list[str]) -> str:
    return ", ".join(modules[:4]) + (", ..." if len(modules) > 4 else "")


def describe(pet_config: dict) -> str:
    keys = ("lora_rank", "lora_alpha", "use_rslora", "use_dora", "lora_dropout", "lora_plus_lr_ratio",
            "modules_to_save", "init_lora_weights", "target_modules", "exclude_layers")
    return ", ".join(f"{k}={pet_config[k]!r}" for k in keys if pet_config.get(k) not in (None, False)
                     and not (k == "init_lora_weights" and pet_config[k] is True))
