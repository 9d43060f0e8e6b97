"""PEFT prefix-tuning adapters (``peft_type: PREFIX_TUNING``): read as mftune's P-tuning v2, written from either
prefix method.

On disk (peft 0.21 ``save_pretrained``): ``adapter_config.json`` and ``adapter_model.safetensors`` holding one
tensor, ``prompt_embeddings`` ``[num_virtual_tokens, num_layers * 2 * token_dim]``: the prefix keys/values
themselves (with ``prefix_projection`` the MLP's output; peft saves no MLP), laid out as mftune's prefix encoder
lays them out (``[layer 0 key | layer 0 value | ...]``, heads first; ``token_dim = n_kv_heads * head_dim``).

PEFT feeds them as a KV cache of P slots, so the real tokens sit at positions P.. and the prefix keys are used as
stored; MindFormers' (mftune's) sit at 0.. . Since RoPE is relative, the two agree exactly when PEFT's keys are
mftune's rotated by RoPE at position P (``mftune.pet.prefix.rotate_prefix_keys``): reading rotates back (the
model's RoPE is needed, so ``entries`` gives the tensor under PEFT's name and ``in_model_positions`` converts
it for a model), writing rotates (``mftune.checkpoint.export``). Read, an adapter is ``pet_type: ptuning2`` with
``prefix_projection: false`` (the table is the keys/values) and ``compute_dtype: float32`` (as PEFT computes).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from torch import nn

from mftune.checkpoint.entries import Entry, merge_entries, safetensors_entries, tensor_entries
from mftune.checkpoint.safetensors_io import load_tensors
from mftune.errors import CheckpointError
from mftune.pet.prefix import prefix_encoder, rotate_prefix_keys
from mftune.pet.prefix_config import training_keys

logger = logging.getLogger("mftune")

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PEFT_KEY = "prompt_embeddings"  # peft's name for the saved prefix
PEFT_TYPE = "PREFIX_TUNING"
KEY_PREFIX = "model.model_config.pet_config"


def matches(path: str) -> bool:
    """A directory whose adapter_config.json says PREFIX_TUNING."""
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        return False
    try:
        with open(config_path) as f:
            return json.load(f).get("peft_type") == PEFT_TYPE
    except (OSError, ValueError, AttributeError):
        return False  # peft_adapter reports the broken file


def read_prefix_adapter(path: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(prompt_embeddings, adapter_config)``, checked against each other."""
    config_path = os.path.join(path, CONFIG_NAME)
    with open(config_path) as f:
        config = json.load(f)
    weights = os.path.join(path, SAFETENSORS_NAME)
    if not os.path.isfile(weights):
        raise CheckpointError(f"adapter_dir={path} is invalid: it has no {SAFETENSORS_NAME}. Save the adapter with "
                              f"peft's save_pretrained (safetensors).")
    tensors = load_tensors(weights)
    if set(tensors) != {PEFT_KEY}:
        raise CheckpointError(f"{weights} is invalid: a prefix-tuning adapter holds only {PEFT_KEY}, found "
                              f"{sorted(tensors)}. Re-save it with peft's save_pretrained.")
    table = tensors[PEFT_KEY]
    errors = []
    if config.get("num_transformer_submodules", 1) != 1:
        errors.append(f"num_transformer_submodules={config.get('num_transformer_submodules')} is invalid: a decoder "
                      f"has one. Use an adapter of a causal language model (task_type CAUSAL_LM).")
    for key in ("num_virtual_tokens", "num_layers", "token_dim"):
        if not isinstance(config.get(key), int) or config[key] <= 0:
            errors.append(f"{key}={config.get(key)!r} is invalid: a positive integer is expected. Use the "
                          f"adapter_config.json peft saved.")
    expected = None if errors else [config["num_virtual_tokens"], 2 * config["num_layers"] * config["token_dim"]]
    if expected and list(table.shape) != expected:
        errors.append(f"{PEFT_KEY} has shape {list(table.shape)}, not [num_virtual_tokens, 2 * num_layers * "
                      f"token_dim] = {expected}. Use the adapter_config.json saved with these weights.")
    if errors:
        raise CheckpointError(f"{len(errors)} problem(s) in {config_path}:\n  " + "\n  ".join(errors))
    return table, config


def entries(path: str) -> dict[str, Entry]:
    """``prompt_embeddings`` under PEFT's name (``in_model_positions`` makes it the model's table), plus the
    complete ``.safetensors`` files beside it (a base)."""
    table, _ = read_prefix_adapter(path)
    others = sorted(os.path.join(path, f) for f in os.listdir(path)
                    if f.endswith(".safetensors") and f != SAFETENSORS_NAME)
    return merge_entries(path, [tensor_entries({PEFT_KEY: table}, path)] + [safetensors_entries(f) for f in others])


def header(path: str) -> dict[str, Any]:
    """``{"pet_config": ...}``: the mftune pet_config equivalent to the adapter."""
    _, config = read_prefix_adapter(path)
    return {"pet_config": pet_config_of(config)}


def pet_config_of(config: dict[str, Any]) -> dict[str, Any]:
    """mftune's equivalent of a PEFT PREFIX_TUNING adapter_config: P-tuning v2 over the stored keys/values."""
    return {"pet_type": "ptuning2", "pre_seq_len": config["num_virtual_tokens"], "prefix_projection": False,
            "dropout_prob": 0.0, "compute_dtype": "float32"}


def effective_pet_config(run_pet_config: dict | None, path: str, args: Any, run_mode: str) -> dict[str, Any]:
    """The pet_config to apply with the adapter at ``path`` on a model of ``args`` (``ModelArgs``): the adapter's
    (what its tensor means); the run's other values are replaced, each difference a WARNING. A model of another
    shape is a CheckpointError."""
    _, config = read_prefix_adapter(path)
    token_dim = args.n_kv_heads * args.head_dim
    if config["num_layers"] != args.num_layers or config["token_dim"] != token_dim:
        raise CheckpointError(
            f"{os.path.join(path, CONFIG_NAME)}: num_layers={config['num_layers']}, token_dim={config['token_dim']} "
            f"do not fit this model (num_layers={args.num_layers}, n_kv_heads * head_dim = {token_dim}). Use the "
            f"adapter with the model it was trained on.")
    adapter = pet_config_of(config)
    if not run_pet_config:
        log = logger.warning if run_mode in ("train", "finetune") else logger.info
        log("%s is empty and load_checkpoint=%s is a PEFT prefix-tuning adapter: its settings are applied (%s)%s",
            KEY_PREFIX, path, adapter, ", so only the prefix trains" if run_mode in ("train", "finetune") else "")
        return adapter
    keep = training_keys(run_pet_config, adapter["pet_type"])
    for key, value in run_pet_config.items():
        carried = "dropout" in key and "dropout_prob" in keep  # the run's dropout, under ptuning2's name
        if key not in keep and adapter.get(key) != value and not carried:
            logger.warning("%s.%s=%r is %s: load_checkpoint=%s is a PEFT prefix-tuning adapter", KEY_PREFIX, key, value,
                           f"replaced by {adapter[key]!r}" if key in adapter else "not used", path)
    logger.info("load_checkpoint=%s is a PEFT prefix-tuning adapter: pet_config %s", path, {**adapter, **keep})
    return {**adapter, **keep}


def in_model_positions(entries: dict[str, Entry], model: nn.Module) -> dict[str, Entry]:
    """``entries`` with a PEFT ``prompt_embeddings`` turned into ``model``'s prefix table (keys rotated back to
    MindFormers' positions: module doc); other entries unchanged."""
    if PEFT_KEY not in entries:
        return entries
    encoder = prefix_encoder(model)
    if encoder is None or encoder.trans is not None:
        raise CheckpointError(f"{entries[PEFT_KEY].origin} is a PEFT prefix-tuning adapter; apply it with "
                              f"pet_config {{pet_type: ptuning2, prefix_projection: false}} (a run without "
                              f"pet_config takes it from the adapter).")
    raw = entries[PEFT_KEY]
    args, num_tokens = model.args, raw.shape[0]
    try:
        table = rotate_prefix_keys(raw.full(), args, num_tokens, inverse=True)
    except ValueError as exc:
        raise CheckpointError(f"{raw.origin}: {exc}.") from None
    name = next(n for n, p in model.named_parameters() if p is encoder.embedding.embedding_table)
    out = {k: e for k, e in entries.items() if k != PEFT_KEY}
    out[name] = Entry(tuple(table.shape), lambda block: table[block], raw.origin)
    return out
