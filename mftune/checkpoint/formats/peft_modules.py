"""PEFT's ``modules_to_save``: whole modules trained beside the adapters, in an adapter directory.

peft saves such a module's tensors under the transformers name with the ``base_model.model.`` prefix
(``base_model.model.lm_head.weight``, ``base_model.model.model.embed_tokens.weight``) and lists the modules in
``adapter_config.json`` (``"modules_to_save": ["lm_head", "embed_tokens"]``), selecting every module whose
name ends with an item (a plain string suffix: peft 0.21's ``_get_submodules`` check). mftune writes full
module paths (``model.embed_tokens``), which select exactly the modules saved. mftune's pet_config key of the
same name takes mftune module names (``lm_head``, ``model.tok_embeddings``); these helpers translate both ways.
"""
from __future__ import annotations

from typing import Any

import torch

from mftune.checkpoint.names import hf_to_mftune, mftune_to_hf
from mftune.errors import CheckpointError

PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel).model (the HF model)


def peft_saved(raw: dict[str, torch.Tensor], config: dict[str, Any], where: str
               ) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(The tensors of ``raw`` (peft names) that belong to the adapter's ``modules_to_save``, under mftune
    names (``lm_head.weight``, ``model.tok_embeddings.embedding_weight``); the peft keys taken). A listed module
    without tensors in the file is an error naming it."""
    wanted = config.get("modules_to_save") or []
    out, seen, taken = {}, set(), set()
    for key, value in raw.items():
        if not key.startswith(PEFT_PREFIX):
            continue
        module = key[len(PEFT_PREFIX):].rpartition(".")[0]
        leaf = next((item for item in wanted if module.endswith(item)), None)  # peft's rule
        if leaf is not None:
            try:
                out[hf_to_mftune(key[len(PEFT_PREFIX):])] = value
                taken.add(key)
            except KeyError:
                raise CheckpointError(f"{where}: {key} (modules_to_save {leaf!r}) is not a tensor of a Llama "
                                      f"model. Use an adapter saved from a Llama model.") from None
            seen.add(leaf)
    missing = [m for m in wanted if m not in seen]
    if missing:
        raise CheckpointError(f"{where}: modules_to_save={wanted} but the file holds no tensor of {missing[0]!r}. "
                              f"Use the adapter's own files.")
    return out, taken


def mftune_module_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The pet_config ``modules_to_save`` (full mftune module names) of saved-module tensors."""
    return sorted({name.rpartition(".")[0] for name in tensors})


def to_peft(tensors: dict[str, torch.Tensor], where: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(peft's keys for mftune saved-module tensors, the adapter_config ``modules_to_save``: their full
    transformers module names). A tensor without a transformers name is an error."""
    out = {}
    for name, value in tensors.items():
        try:
            out[PEFT_PREFIX + mftune_to_hf(name)] = value
        except KeyError:
            raise CheckpointError(f"{where}: {name} (modules_to_save) has no Hugging Face name, so a PEFT adapter "
                                  f"cannot carry it. Export a run that trains only named modules.") from None
    return out, sorted({key[len(PEFT_PREFIX):].rpartition(".")[0] for key in out})
