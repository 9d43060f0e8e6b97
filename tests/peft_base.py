"""A random transformers Llama saved as an mftune base checkpoint, and LoRA training checkpoints over it
saved by the trainer's CheckpointMonitor, for the PEFT export tests (tests/unit/test_peft_export.py,
tests/e2e/test_export_script.py)."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import transformers

from mftune.checkpoint.formats.single_file import save_complete
from mftune.checkpoint.load import fingerprint
from mftune.checkpoint.names import hf_config_to_model_config, hf_to_mftune, is_hf_buffer
from mftune.checkpoint.safetensors_io import load_tensors
from mftune.models.config import LlamaConfig
from mftune.models.llama import LlamaForCausalLM
from mftune.pet import LORA_MARK, get_pet_model, lora_layers
from mftune.trainer.checkpointing import CheckpointMonitor

VOCAB = 128
HF_CONFIG = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
             "tie_word_embeddings": False}
ATTN = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.05,
        "target_modules": ".*wq|.*wk|.*wv|.*wo"}  # configs/llama2/lora_llama2_7b.yaml's, smaller rank
SUBSET = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 16, "lora_dropout": 0.0,
          "target_modules": ".*wq|.*wv", "exclude_layers": "1"}  # layer "1" is skipped
MLP = {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 3.5, "lora_dropout": 0.1, "target_modules": ".*w1|.*w2|.*w3"}


def build_base(d) -> SimpleNamespace:
    """A random fp32 transformers Llama (GQA: 4 heads, 2 KV heads) saved in ``d`` as an mftune complete base
    checkpoint."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**HF_CONFIG)
    hf = transformers.LlamaForCausalLM(cfg).float()
    hf_state = {k: v for k, v in hf.state_dict().items() if not is_hf_buffer(k)}
    # compute_dtype float32: MindFormers' default float16 matmuls would differ from the fp32 reference by ~1e-3.
    model_config = LlamaConfig.from_dict({**hf_config_to_model_config(cfg.to_dict()), "compute_dtype": "float32"}).to_dict()
    path = str(d / "base.safetensors")
    save_complete(path, {hf_to_mftune(k): v for k, v in hf_state.items()}, model_config=model_config,
                  extra_metadata={"run_mode": "train"})
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(7))
    return SimpleNamespace(cfg=cfg, hf_state=hf_state, model_config=model_config, path=path, ids=ids, dir=d)


def mftune_model(base, pet_config) -> LlamaForCausalLM:
    model = LlamaForCausalLM(dict(base.model_config))
    get_pet_model(model, pet_config)
    missing, unexpected = model.load_state_dict(load_tensors(base.path), strict=False)
    assert not unexpected and missing and all(LORA_MARK in k for k in missing)
    return model


def lora_checkpoint(base, pet_config, name, seed=1):
    """(mftune model in eval mode, checkpoint path): random non-zero A/B, one AdamW step, saved by CheckpointMonitor."""
    model = mftune_model(base, pet_config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in (layer.mindpet_delta_lora_a, layer.mindpet_delta_lora_b):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(base.ids).pow(2).mean().backward()
    optimizer.step()
    model.eval()
    monitor = CheckpointMonitor(str(base.dir / name), "llama_lora")
    extra = {"run_mode": "finetune", "pet_config": pet_config,
             "base_checkpoint": {"path": base.path, "fingerprint": fingerprint(base.path)}}
    path = monitor.save(model, optimizer, epoch=1, step_in_epoch=1, global_step=1, loss_scale=1.0,
                        global_batch_size=2, model_config={**base.model_config, "pet_config": pet_config},
                        extra_metadata=extra)
    return model, path
