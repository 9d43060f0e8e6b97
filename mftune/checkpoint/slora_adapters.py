"""The adapters of an S-LoRA run (``pet_type: slora``, ``mftune.pet.slora``): MindFormers' ``adapter_path`` JSON
``{"name": "PEFT adapter directory", ...}`` read, each directory read as a PEFT LoRA adapter
(``mftune.checkpoint.formats.peft_adapter``: the same checks as a single adapter), their layers united and their
ranks padded to the largest (``apply``), and their factors put in the slots (``load``). A relative directory is
taken from the working directory, else from the JSON file's folder.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from mftune.checkpoint.adapter_config import adapter_pet_config
from mftune.checkpoint.formats.peft_adapter import read_peft_adapter
from mftune.errors import CheckpointError
from mftune.pet import lora_targets
from mftune.pet.config import lora_scaling
from mftune.pet.slora import apply_slora, fill_adapters
from mftune.pet.targets import HEAD

logger = logging.getLogger("mftune")

KEY = "model.model_config.pet_config.adapter_path"


def adapter_dirs(adapter_path: str) -> dict[str, str]:
    """``{name: directory}`` of the JSON file; a CheckpointError naming the file and the fix for anything else."""
    if not os.path.isfile(adapter_path):
        raise CheckpointError(f"{KEY}={adapter_path} does not exist. Give a JSON file "
                              f'{{"name": "PEFT adapter directory", ...}}.')
    try:
        with open(adapter_path) as f:
            found = json.load(f)
    except ValueError as exc:
        raise CheckpointError(f"{KEY}={adapter_path} is not valid JSON ({exc}). Write "
                              f'{{"name": "PEFT adapter directory", ...}}.') from None
    if not isinstance(found, dict) or not found or not all(isinstance(v, str) for v in found.values()):
        raise CheckpointError(f"{KEY}={adapter_path} is invalid: expected a non-empty JSON object of adapter names to "
                              f'directories, e.g. {{"math": "./lora_math", "code": "./lora_code"}}.')
    out = {}
    for name, directory in found.items():
        here = os.path.join(os.path.dirname(os.path.abspath(adapter_path)), directory)
        path = directory if os.path.isabs(directory) or os.path.isdir(directory) else here
        if not os.path.isdir(path):
            raise CheckpointError(f"{KEY}={adapter_path}: adapter {name!r} is {directory}, which is not a directory. "
                                  f"Give each adapter's PEFT directory (adapter_config.json + adapter_model.*).")
        out[str(name)] = path
    return out


def apply(model: nn.Module, adapter_path: str) -> list[str]:
    """Wrap the union of the adapters' layers in ``model`` (plain, e.g. on meta); returns the adapter names."""
    dirs = adapter_dirs(adapter_path)
    modules: list[str] = []
    rank = 0
    for name, directory in dirs.items():
        pet_config, config, config_path = adapter_pet_config(directory, model.config.num_layers)
        for key in ("use_dora", "modules_to_save"):
            if pet_config.get(key):
                raise CheckpointError(f"{config_path}: {key}={json.dumps(config.get(key))} is invalid for S-LoRA "
                                      f"adapter {name!r}: mftune's multi-adapter serving holds A and B only. Merge "
                                      f"that adapter into its own base, or use an adapter without {key}.")
        modules += [m for m in lora_targets(model, pet_config) if m not in modules]
        rank = max(rank, pet_config["lora_rank"])
    order = [n for n, _ in model.named_modules()]
    apply_slora(model, list(dirs), rank, sorted(modules, key=order.index))
    logger.info("S-LoRA: %d adapters (%s) of rank up to %d on %d layers (%s, ...); --adapter_id picks one per prompt",
                len(dirs), ", ".join(dirs), rank, len(modules), modules[0] if modules else "none")
    return list(dirs)


def _check_own_head(model: nn.Module, head: torch.Tensor | None, name: str, directory: str) -> None:
    """peft saves the whole lm_head beside LoRA on it (save_embedding_layers); a single adapter brings it in place of
    the base's, but S-LoRA has one head for every row: it must be the base's. A collective when sharded."""
    if head is None:
        return
    weight = model.lm_head.weight
    ours = weight.full_tensor() if isinstance(weight, DTensor) else weight
    if tuple(head.shape) != tuple(ours.shape) or not torch.equal(head.to(ours.device, ours.dtype), ours.detach()):
        raise CheckpointError(f"{directory} (S-LoRA adapter {name!r}) carries its own lm_head weights (peft's "
                              f"save_embedding_layers), which differ from the base's: S-LoRA has one head for every "
                              f"prompt. Predict with that adapter alone (pet_type lora), or save it without them.")


def load(model: nn.Module, adapter_path: str, fill: Callable | None = None) -> None:
    """Read every adapter of ``adapter_path`` into its slot of ``model`` (``apply`` done), each with its own
    scaling."""
    dirs, adapters = adapter_dirs(adapter_path), []
    for name, directory in dirs.items():
        tensors, pet_config = read_peft_adapter(directory)  # as apply's adapter_pet_config read it
        _check_own_head(model, tensors.pop(f"{HEAD}.weight", None), name, directory)
        scaling = lora_scaling(pet_config["lora_alpha"], pet_config["lora_rank"], pet_config["use_rslora"])
        adapters.append((tensors, scaling))
    adapted = fill_adapters(model, adapters, fill)
    for name, modules in zip(dirs, adapted):
        logger.info("S-LoRA adapter %r: %d layers", name, len(modules))
