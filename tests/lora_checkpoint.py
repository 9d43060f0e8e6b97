"""A base checkpoint and a LoRA training checkpoint over it, written as the trainer writes them
(adapters, AdamW moments, counters; pet_config and base_checkpoint {path, fingerprint} in the header),
for the merge tests (tests/unit/test_merge.py, tests/e2e/test_merge_script.py)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from mftune.checkpoint.formats.single_file import save_complete
from mftune.checkpoint.load import fingerprint, unique_state_dict
from mftune.models.config import LlamaConfig
from mftune.models.llama import LlamaForCausalLM
from mftune.pet import get_pet_model, lora_layers, lora_state_dict

TINY = {"vocab_size": 128, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "n_kv_heads": 2, "seq_length": 16,
        "intermediate_size": 96, "compute_dtype": "float32", "param_init_type": "float32", "initializer_range": 0.1}
PET = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "target_modules": ".*wq|.*wv"}  # scaling 2


def tokens() -> torch.Tensor:
    """Ids without the pad id 0 (mftune hides pad inputs as MindFormers does; transformers does not)."""
    return torch.randint(1, TINY["vocab_size"], (2, TINY["seq_length"]), generator=torch.Generator().manual_seed(3))


def save_lora(path, tensors, model_config, base_checkpoint, pet=PET):
    save_complete(path, tensors, model_config={**model_config, "pet_config": pet},
                  extra_metadata={"run_mode": "finetune", "pet_config": pet, "base_checkpoint": base_checkpoint})


def build(d, pet=PET) -> SimpleNamespace:
    """In the folder ``d``: the base, the LoRA checkpoint (``pet``: its pet_config), and the LoRA and base models'
    logits on ``tokens()``."""
    torch.manual_seed(0)
    mc = LlamaConfig(**TINY).to_dict()
    base_model = LlamaForCausalLM(dict(TINY)).eval()
    base_path = str(d / "base.safetensors")
    save_complete(base_path, unique_state_dict(base_model), model_config=mc, extra_metadata={"run_mode": "train"})
    lora_model = copy.deepcopy(base_model)
    get_pet_model(lora_model, pet).eval()  # the new LoRA dropout modules start in training mode
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(lora_model):
            for p in (layer.mindpet_delta_lora_a, layer.mindpet_delta_lora_b):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    adapters = lora_state_dict(lora_model)
    tensors = {**adapters, **{f"adam_m.{k}": torch.rand_like(v) for k, v in adapters.items()},
               **{f"adam_v.{k}": torch.rand_like(v) for k, v in adapters.items()},
               "epoch_num": torch.tensor(1), "step_num": torch.tensor(3), "global_step": torch.tensor(3),
               "loss_scale": torch.tensor(1.0)}
    recorded = {"path": base_path, "fingerprint": fingerprint(base_path)}
    lora_path = str(d / "lora_rank_0-1_3.safetensors")
    save_lora(lora_path, tensors, mc, recorded, pet)
    x = tokens()
    with torch.no_grad():
        lora_logits, base_logits = lora_model(x), base_model(x)
    return SimpleNamespace(dir=d, mc=mc, base_path=base_path, lora_path=lora_path, lora_model=lora_model,
                           tensors=tensors, recorded=recorded, x=x, lora_logits=lora_logits, base_logits=base_logits)
