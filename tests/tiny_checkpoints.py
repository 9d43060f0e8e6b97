"""A tiny Llama (LoRA on wq/wv) and checkpoints of it: a complete training checkpoint (weights, adapters
with AdamW moments, counters, an RNG state, one tensor that is not a parameter) and strategy files of
N-rank layouts; for the loading and transform tests."""
from __future__ import annotations

import json
import os

import torch

from mftune.checkpoint.formats.single_file import save_complete
from mftune.models.llama import LlamaForCausalLM
from mftune.pet import get_pet_model

CFG = {"seq_length": 16, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "n_kv_heads": 2,
       "vocab_size": 64, "multiple_of": 16}
LORA = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ".*wq|.*wv"}
COUNTERS = {"epoch_num": 1, "step_num": 4, "global_step": 4, "global_batch_size": 8}


def tiny_model(lora: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """The tiny model with random weights; with ``lora``, LoRA applied and its adapters random too."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(dict(CFG))
    if lora:
        get_pet_model(model, dict(LORA))
        for name, p in model.named_parameters():
            if "lora" in name:
                torch.nn.init.normal_(p)
    return model


def training_file(tmp_path):
    """A complete training checkpoint in ``tmp_path``: weights, adapters' AdamW moments, counters, an
    RNG state and one tensor that is not a parameter; returns (path, its tensors, the model)."""
    model = tiny_model(lora=True)
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        if p.requires_grad:
            tensors[f"adam_m.{name}"] = torch.randn_like(p)
            tensors[f"adam_v.{name}"] = torch.rand_like(p)
    tensors.update({k: torch.tensor(v) for k, v in COUNTERS.items()})
    tensors["loss_scale"] = torch.tensor(1.0)
    tensors["rng_state"] = torch.get_rng_state()
    tensors["extra.table"] = torch.arange(12.0).reshape(3, 4)
    path = str(tmp_path / "train.safetensors")
    save_complete(path, tensors, model_config={**CFG, "pet_config": LORA},
                  extra_metadata={"pet_config": LORA, "base_checkpoint": {"path": "/b", "fingerprint": "f"}})
    return path, tensors, model


def blocks(shape, world, dim):
    """Each rank's block when ``dim`` is split like torch.chunk (DTensor's Shard)."""
    if not shape:
        return [[] for _ in range(world)]
    n = shape[dim]
    size = -(-n // world)
    out = []
    for r in range(world):
        block = [[0, s] for s in shape]
        block[dim] = [min(r * size, n), min((r + 1) * size, n)]
        out.append(block)
    return out


def write_strategy(directory, model, world, dim):
    os.makedirs(directory, exist_ok=True)
    params = {n: list(p.shape) for n, p in model.named_parameters()}
    for r in range(world):
        tensors = {n: {"global_shape": s, "dtype": "float32", "block": blocks(s, world, dim % len(s))[r],
                       "placements": []} for n, s in params.items()}
        with open(os.path.join(directory, f"ckpt_strategy_rank_{r}.json"), "w") as f:
            json.dump({"rank": r, "world_size": world, "mesh": {"dp": 1, "tp": world}, "tensors": tensors}, f)
    return str(directory)
