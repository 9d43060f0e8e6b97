"""mftune prefix-tuning / P-tuning v2 checkpoint -> PEFT ``PREFIX_TUNING`` adapter (``scripts/export_adapter.py``).

PEFT stores a prefix as its keys/values themselves (``prompt_embeddings``; ``mftune.checkpoint.formats.peft_prefix``),
so the export runs the checkpoint's prefix encoder once (its projection MLP, in its ``compute_dtype``: the values
mftune's attention sees), rotates the keys to PEFT's positions, and writes them with ``prefix_projection: false``
(the stored tensor is the prefix, as peft itself saves one). P-tuning v2 has no other PEFT equivalent: PEFT's
``P_TUNING`` is P-tuning v1 (a prompt encoder over the input embeddings), not a per-layer prefix.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mftune.checkpoint.formats.peft_prefix import PEFT_KEY, PEFT_TYPE
from mftune.errors import CheckpointError
from mftune.models.config import LlamaConfig, model_args
from mftune.pet.prefix import PrefixEncoder, rotate_prefix_keys
from mftune.pet.prefix_config import PrefixConfig

Loader = Callable[[list[str]], dict[str, torch.Tensor]]  # load(names) -> {name: full tensor}, as export's


def prefix_adapter(meta: dict[str, Any], pet_config: dict[str, Any], keys: list[str], load: Loader,
                   src: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config fields, {"prompt_embeddings": [P, 2 L token_dim]})`` of a prefix checkpoint."""
    model_config = meta.get("model_config")
    if not isinstance(model_config, dict):
        raise CheckpointError(f"src_checkpoint={src} is invalid: its header records no model_config, which the "
                              f"prefix's layout and RoPE come from. Export a checkpoint written by run_finetune.py.")
    try:
        config = PrefixConfig.from_dict(dict(pet_config))
        args = model_args(LlamaConfig.from_dict({k: v for k, v in model_config.items() if k != "pet_config"}))
    except ValueError as exc:
        raise CheckpointError(f"src_checkpoint={src}: its header is invalid ({exc}).") from None
    encoder = PrefixEncoder(config, args.num_layers, args.n_kv_heads, args.head_dim)
    names = {f"{config.mark}_{n}": n for n, _ in encoder.named_parameters()}  # embedding.x -> <mark>_embedding.x
    missing = [k for k in names if k not in keys]
    if missing:
        raise CheckpointError(f"src_checkpoint={src} is invalid: its pet_config is {config.pet_type} but it holds no "
                              f"{missing[0]}. Export the checkpoint the run saved.")
    tensors = load(list(names))
    encoder.load_state_dict({names[k]: v for k, v in tensors.items()})
    with torch.no_grad():
        kv = encoder(1, training=False)[0].float()  # (P, 2L, n_kv_heads, head_dim): what attention sees
    try:
        table = rotate_prefix_keys(kv.reshape(kv.shape[0], -1), args, config.num_tokens)
    except ValueError as exc:
        raise CheckpointError(f"src_checkpoint={src}: {exc}. It cannot be exported to PEFT.") from None
    token_dim = args.n_kv_heads * args.head_dim
    fields = {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "num_virtual_tokens": config.num_tokens,
              "token_dim": token_dim, "num_attention_heads": args.n_kv_heads, "num_layers": args.num_layers,
              "num_transformer_submodules": 1, "encoder_hidden_size": config.hidden if config.projection else token_dim,
              "prefix_projection": False, "inference_mode": True, "init_weights": None, "modules_to_save": None,
              "auto_mapping": None, "revision": None}
    return fields, {PEFT_KEY: table.contiguous()}
