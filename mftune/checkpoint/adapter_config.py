"""The pet_config of a run whose ``load_checkpoint`` is a PEFT adapter: the adapter's own.

A PEFT adapter means what its ``adapter_config.json`` says: ``r``, ``lora_alpha`` (scaling = alpha / r, or
alpha / sqrt(r) with ``use_rslora``), ``use_dora``, ``lora_dropout``, and the layers that ``target_modules`` /
``layers_to_transform`` / ``layers_pattern`` / ``exclude_modules`` select. The model is built (LoRA applied)
before weights are read, so this is decided first, by ``effective_pet_config``, from the run's pet_config, the
adapter and the (meta-device) model.

The rule for a conflict: the adapter's values win, because they are what the adapter was trained with (PEFT
applies an adapter with its own config too); each value of the run's pet_config that differs is a WARNING
naming both. A run without pet_config takes the adapter's. Keys an adapter has no say in (``param_init_type``,
``compute_dtype``, ``freeze_include`` / ``freeze_exclude``, ``lora_plus_lr_ratio``) stay the run's; its
``modules_to_save`` (whole modules trained beside the adapters) is applied. What mftune cannot honour
(biases, per-module ranks, LoRA outside the decoder layers, a selection that is not the same module types in
every adapted layer, a config that selects other modules than the file holds) is a CheckpointError naming the
field and its value (``mftune.checkpoint.formats.peft_adapter``).

Which modules PEFT adapts (peft 0.21's ``check_target_module_exists``, run on every module name of the
transformers model): ``target_modules`` a string is a regex ``re.fullmatch``ed against the full name
(``model.layers.0.self_attn.q_proj``), or ``all-linear`` (every Linear but lm_head); a list matches a name
equal to an item or ending in ``.<item>``, and only then ``layers_to_transform`` (an int or a list) keeps the
layers whose index (the number after ``<layers_pattern>.``, or after the first ``<word>.``) it names.
Absent ``target_modules``: peft's default for Llama, ``q_proj`` and ``v_proj``.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any

from torch import nn

from mftune.checkpoint.formats import peft_adapter, peft_prefix
from mftune.checkpoint.formats.peft_adapter import (LINEAR_LEAVES, grid_pet_config, lora_grid, read_adapter_config,
                                                    read_peft_adapter)
from mftune.checkpoint.keys import is_lora
from mftune.checkpoint.names import MFTUNE_TO_HF_TOP, mftune_to_hf
from mftune.checkpoint.recorded_pet import KEY_PREFIX, checkpoint_pet_config, describe, first, source, yaml_targets
from mftune.errors import CheckpointError
from mftune.pet import LoraConfig, lora_targets
from mftune.pet.targets import HEAD
from mftune.pet.config import init_method, is_base_init

logger = logging.getLogger("mftune")

# mftune pet_config key -> the adapter_config.json field that sets it
ADAPTER_FIELDS: dict[str, str] = {"lora_rank": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                                  "use_rslora": "use_rslora", "use_dora": "use_dora",
                                  "modules_to_save": "modules_to_save"}
PEFT_LLAMA_DEFAULT_TARGETS = ["q_proj", "v_proj"]  # peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
ALL_LINEAR = "all-linear"  # peft's INCLUDE_LINEAR_LAYERS_SHORTHAND
# transformers module names outside the decoder layers that a target_modules may select (PEFT would put LoRA
# on the embedding and on lm_head); mftune's LoRA is on decoder-layer Linears and lm_head only
OUTSIDE_LAYERS = tuple(v[: -len(".weight")] for k, v in MFTUNE_TO_HF_TOP.items() if not k.endswith("norm_out.weight"))


def effective_pet_config(run_pet_config: dict | None, load_checkpoint: str, model: nn.Module,
                         run_mode: str) -> dict | None:
    """The pet_config to apply to ``model`` (a plain Llama, e.g. on meta, LoRA not yet applied): the run's,
    unless ``load_checkpoint`` is a PEFT adapter directory, then the adapter's over the run's (module doc), or
    an mftune checkpoint holding LoRA weights, then the pet_config it records over the run's
    (``mftune.checkpoint.recorded_pet``)."""
    if not load_checkpoint:
        return run_pet_config
    if peft_prefix.matches(load_checkpoint):
        return peft_prefix.effective_pet_config(run_pet_config, load_checkpoint, model.args, run_mode)
    if not peft_adapter.matches(load_checkpoint):
        return checkpoint_pet_config(run_pet_config, load_checkpoint, model, run_mode)
    adapter, config, config_path = adapter_pet_config(load_checkpoint, model.config.num_layers)
    if not run_pet_config:
        log = logger.warning if run_mode in ("train", "finetune") else logger.info
        log("model.model_config.pet_config is empty and load_checkpoint=%s is a PEFT LoRA adapter: its settings "
            "are applied (%s)%s", load_checkpoint, describe(adapter),
            ", so only the adapters train" if run_mode in ("train", "finetune") else "")
        return adapter
    effective = {**run_pet_config, **{k: adapter[k] for k in ADAPTER_FIELDS}, "pet_type": "lora"}
    yaml = LoraConfig(**run_pet_config)
    for key, field in ADAPTER_FIELDS.items():
        if getattr(yaml, key) != adapter[key]:
            logger.warning("%s.%s=%s (%s) is replaced by the adapter's %s=%s (%s)", KEY_PREFIX, key,
                           getattr(yaml, key), source(run_pet_config, key), field, adapter[key], config_path)
    if is_base_init(init_method(run_pet_config.get("init_lora_weights", True))):  # not over trained adapters
        logger.warning("%s.init_lora_weights=%s is replaced by true: the adapter (%s) holds trained values for the "
                       "original base", KEY_PREFIX, run_pet_config["init_lora_weights"], config_path)
        effective["init_lora_weights"] = True
    ours, theirs = lora_targets(model, run_pet_config), lora_targets(model, adapter)
    if ours != theirs:
        effective["target_modules"], effective["exclude_layers"] = adapter["target_modules"], adapter.get(
            "exclude_layers")
        logger.warning("%s (%s) is replaced by the adapter's %s (%s): LoRA on %d layers (%s) instead of %d",
                       yaml_targets(run_pet_config), source(run_pet_config, "target_modules"),
                       _adapter_targets(config), config_path, len(theirs), first(theirs), len(ours))
    logger.info("load_checkpoint=%s is a PEFT LoRA adapter: pet_config %s", load_checkpoint, describe(effective))
    return effective


def adapter_pet_config(adapter_dir: str, num_layers: int) -> tuple[dict[str, Any], dict[str, Any], str]:
    """``(the mftune pet_config of the PEFT adapter at adapter_dir on a model of num_layers layers, its
    adapter_config.json, that file's path)``; a CheckpointError when the config selects other modules than
    the weights hold (peft would drop or start them fresh, each with a warning)."""
    config, config_path = read_adapter_config(adapter_dir)
    selected = peft_selected(config, num_layers, config_path)  # the config's own problems first
    tensors, read = read_peft_adapter(adapter_dir)
    held = {k.rpartition(".")[0] for k in tensors if is_lora(k)}
    deeper = sorted(m for m in held - {HEAD} if int(m.split(".")[2]) >= num_layers)
    if deeper:
        raise CheckpointError(f"{adapter_dir} holds LoRA for {_hf(deeper[0])} but the model has num_layers="
                              f"{num_layers}. Use the adapter with the model it was trained on.")
    if held != selected:
        raise CheckpointError(_mismatch(config, held, selected, adapter_dir, config_path))
    layers, leaves = lora_grid(held, config_path)
    pet_config = grid_pet_config(config, config.get("r", 8), layers, leaves,
                                 partial=bool(layers) and layers != list(range(num_layers)))
    pet_config["modules_to_save"] = read.get("modules_to_save")  # trained whole beside the adapters
    return pet_config, config, config_path


def peft_selected(config: dict[str, Any], num_layers: int, where: str) -> set[str]:
    """The mftune module paths (``model.layers.0.attention.wq``) that PEFT adapts for ``config`` on a Llama of
    ``num_layers`` layers; a CheckpointError when it selects a module outside the decoder layers."""
    names = {_hf(f"model.layers.{i}.{leaf}"): f"model.layers.{i}.{leaf}"
             for i in range(num_layers) for leaf in LINEAR_LEAVES}
    target = config.get("target_modules")
    if target is None:
        target = PEFT_LLAMA_DEFAULT_TARGETS
    elif isinstance(target, str) and target.lower() == ALL_LINEAR:
        target = sorted(names)  # every Linear of the decoder layers (peft leaves lm_head out)
    errors = _selection_errors(config, target)
    if errors:
        raise CheckpointError(f"{len(errors)} problem(s) in {where}:\n  " + "\n  ".join(errors))
    names[HEAD] = HEAD  # LoRA on lm_head: mftune's too (not in all-linear, as in peft)
    outside = [name for name in OUTSIDE_LAYERS if name != HEAD and _selects(config, target, name)]
    if outside:
        raise CheckpointError(
            f"{where}: target_modules={json.dumps(config.get('target_modules'))} is invalid: it puts LoRA on "
            f"{outside[0]}, and mftune's LoRA is on the decoder layers' Linears (q/k/v/o_proj, gate/up/down_proj) "
            f"and lm_head only. {peft_adapter.MERGE_FIX}")
    return {module for name, module in names.items() if _selects(config, target, name)}


def _selection_errors(config: dict[str, Any], target: Any) -> list[str]:
    """The field types and combinations peft's LoraConfig refuses (it would not load the adapter either)."""
    def err(key: str, why: str) -> str:
        return f"{key}={json.dumps(config.get(key))} is invalid: {why}. Fix adapter_config.json."

    errors = []
    if not (isinstance(target, str) or (isinstance(target, list) and all(isinstance(t, str) for t in target))):
        errors.append(err("target_modules", "must be a regex string or a list of module names"))
    elif isinstance(target, str):
        try:
            re.compile(target)
        except re.error as exc:
            errors.append(err("target_modules", f"not a valid regular expression ({exc})"))
    layers = config.get("layers_to_transform")
    if layers is not None and not (isinstance(layers, int) or (
            isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers))):
        errors.append(err("layers_to_transform", "must be a layer index or a list of them"))
    for key in ("layers_to_transform", "layers_pattern"):
        if isinstance(config.get("target_modules"), str) and config.get(key) is not None:
            errors.append(err(key, "peft refuses it with a regex target_modules"))
    pattern = config.get("layers_pattern")
    if pattern and config.get("layers_to_transform") is None:
        errors.append(err("layers_pattern", "peft needs layers_to_transform with it"))
    return errors


def _selects(config: dict[str, Any], target: str | list[str], key: str) -> bool:
    """peft's ``check_target_module_exists`` for the module named ``key`` (transformers naming)."""
    if _excluded(config.get("exclude_modules"), key):
        return False
    if isinstance(target, str):
        return re.fullmatch(target, key) is not None
    if key in target:
        return True
    found = any(key.endswith(f".{t}") for t in target)
    indexes = config.get("layers_to_transform")
    if not found or indexes is None or indexes == []:
        return found
    patterns = config.get("layers_pattern")
    patterns = [patterns] if isinstance(patterns, str) else (patterns or [])
    match = (re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key) if not patterns else
             next((m for m in (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key) for p in patterns) if m), None))
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


def _excluded(exclude: Any, key: str) -> bool:
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, key) is not None
    return key in exclude or any(key.endswith(f".{e}") for e in exclude)


def _mismatch(config: dict, held: set[str], selected: set[str], adapter_dir: str, config_path: str) -> str:
    fields = ", ".join(f"{k}={json.dumps(config.get(k))}" for k in ("target_modules", "layers_to_transform",
                                                                     "layers_pattern", "exclude_modules")
                       if config.get(k) is not None)
    extra, absent = sorted(held - selected), sorted(selected - held)
    if extra:
        what = (f"the adapter's weights hold LoRA for {_hf(extra[0])} ({len(extra)} such modules), which "
                f"{fields or 'target_modules (absent: q_proj, v_proj)'} does not select (peft would drop them)")
    else:
        what = (f"{fields or 'target_modules (absent: q_proj, v_proj)'} selects {_hf(absent[0])} ({len(absent)} "
                f"such modules), for which the adapter's weights hold no LoRA (peft would start them fresh)")
    return (f"{config_path} does not describe the weights in {adapter_dir}: {what}. Use the adapter_config.json "
            f"that was saved with these weights.")


def _hf(module: str) -> str:
    """``model.layers.0.attention.wq`` -> ``model.layers.0.self_attn.q_proj``."""
    return mftune_to_hf(f"{module}.weight")[: -len(".weight")]


def _adapter_targets(config: dict) -> str:
    text = f"target_modules={json.dumps(config.get('target_modules'))}"
    if config.get("layers_to_transform") is not None:
        text += f" with layers_to_transform={json.dumps(config['layers_to_transform'])}"
    return text
