"""A tiny random transformers Llama shared by the tests that compare against transformers."""
from __future__ import annotations

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
