"""A tiny random transformers Llama shared by the tests that compare against transformers, and
Hugging Face directories of it written in each layout transformers uses (``CASES``)."""
from __future__ import annotations

import json
import os

import torch
import transformers

from mftune.checkpoint.names import hf_config_to_model_config, hf_to_mftune
from mftune.models.llama import LlamaForCausalLM

VOCAB = 128


def hf_model(n_kv_heads: int = 2, tie: bool = False, seed: int = 0, **overrides) -> "transformers.LlamaForCausalLM":
    """A tiny transformers Llama (~310 KB in fp32) with random weights, norms included; ``overrides``
    are further LlamaConfig fields."""
    config = transformers.LlamaConfig(**{
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": n_kv_heads, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": tie, "pad_token_id": 0, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.1)
    return model


def mftune_from_hf(hf, **overrides) -> LlamaForCausalLM:
    """mftune model from the HF config (names.py), fp32 unless ``overrides`` say otherwise, HF weights renamed."""
    mc = hf_config_to_model_config(hf.config.to_dict())
    mc.update({"compute_dtype": "float32", "param_init_type": "float32", **overrides})
    model = LlamaForCausalLM(mc)
    model.load_state_dict({hf_to_mftune(k): v for k, v in hf.state_dict().items()}, strict=True)
    return model.eval()


def save_bin(model, directory: str, shards: int) -> None:
    """transformers 4's ``save_pretrained(safe_serialization=False)`` layout, written by hand."""
    model.config.save_pretrained(directory)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(sd, os.path.join(directory, "pytorch_model.bin"))
        return
    names, weight_map = list(sd), {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in names[i::shards]}
        torch.save(part, os.path.join(directory, file))
        weight_map.update(dict.fromkeys(part, file))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


CASES = {  # name -> (model kwargs, how transformers / save_bin writes it)
    "single_safetensors_gqa": (dict(n_kv_heads=2), dict()),
    "sharded_safetensors": (dict(n_kv_heads=4), dict(max_shard_size="100KB")),
    "bin_sharded": (dict(n_kv_heads=2), dict(bin_shards=3)),
    "bin_single_tied": (dict(n_kv_heads=2, tie=True), dict(bin_shards=1)),
    "tied_safetensors": (dict(n_kv_heads=4, tie=True), dict()),
}


def hf_dirs(make_dir, cases) -> dict[str, tuple["transformers.LlamaForCausalLM", str]]:
    """Each case's transformers model and the directory it is saved in (``make_dir(case)`` makes it)."""
    out = {}
    for case in cases:
        model_kwargs, save_kwargs = CASES[case]
        model, directory = hf_model(**model_kwargs), str(make_dir(case))
        if "bin_shards" in save_kwargs:
            save_bin(model, directory, save_kwargs["bin_shards"])
        else:
            model.save_pretrained(directory, **save_kwargs)
        out[case] = (model, directory)
    return out
