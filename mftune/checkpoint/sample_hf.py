"""A tiny random Llama 3-style Hugging Face model directory, built without transformers or a download
(``scripts/demo_hf.py``, the README's second embedded example).

What a Llama 3.x Instruct download holds, with the architecture shrunk (``SAMPLE_ARCHITECTURE``): the
tokenizer files of ``mftune.data.sample_hf`` (byte-level BPE trained on the bundled sample, Llama 3's special
tokens and Instruct chat template); config.json (``model_type: llama``, GQA, tied embeddings, ``rope_theta``
500000, ``rope_scaling`` ``llama3`` with Llama 3.1's factors, eos a list that holds ``<|eot_id|>``, no pad
id, ``torch_dtype: bfloat16``); generation_config.json (bos, the eos list); ``model.safetensors`` with
random weights under Hugging Face names, in bfloat16, ``lm_head`` left out as transformers saves tied models.

The weights are mftune's own initialisation (``LlamaForCausalLM.init_weights``: N(0, initializer_range), norms
1) under ``seed``, renamed by ``mftune.checkpoint.names``; config.json is ``model_config_to_hf_config`` of the
same model_config (less its pad id), as ``convert_weight.py --reversed`` derives it. The directory appears
complete or not at all (``mftune.fileio.atomic_directory``); the same seed and records give the same files.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from mftune.checkpoint.load import unique_state_dict
from mftune.checkpoint.names import mftune_to_hf, model_config_to_hf_config
from mftune.checkpoint.safetensors_io import save_safetensors
from mftune.data.sample_hf import SAMPLE_MAX_LENGTH, SampleTokenizer, write_sample_hf_tokenizer
from mftune.fileio import atomic_directory, atomic_open
from mftune.models.config import LlamaConfig
from mftune.models.llama import LlamaForCausalLM

# model_config keys of the architecture: Llama 3.2 1B's shape, shrunk (4 query heads per kv head, FFN 4x hidden,
# tied embeddings, RoPE base 500000 and Llama 3.1's scaling: its original length 8192 -> 128, context 131072 -> 1024).
# initializer_range: LoRA leaves the final norm and the tied embeddings frozen, so a logit is at most |final
# hidden state| x |embedding row| = sqrt(128) x std sqrt(128): 2.6 with Llama's 0.02, which keeps the loss above
# ~4.3 whatever LoRA learns; with ~1/sqrt(hidden_size) it is 11.5, and a 2-epoch run takes the loss from ~7 to ~3.
SAMPLE_ARCHITECTURE: dict[str, Any] = {
    "hidden_size": 128, "intermediate_size": 512, "num_layers": 2, "num_heads": 8, "n_kv_heads": 2,
    "rms_norm_eps": 1e-5, "theta": 500000.0, "extend_method": "LLAMA3",
    "scaling_factor": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": SAMPLE_MAX_LENGTH // 8},
    "max_position_embedding": SAMPLE_MAX_LENGTH, "tie_word_embeddings": True, "initializer_range": 0.09,
}
SAMPLE_DTYPE = "bfloat16"  # what the weights are stored in (config.json's torch_dtype), as Meta ships Llama 3


def sample_model_config(tokenizer: SampleTokenizer) -> dict[str, Any]:
    """``model.model_config`` of the sample model for ``tokenizer`` (its vocabulary and special ids)."""
    return {**SAMPLE_ARCHITECTURE, "vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": list(tokenizer.eos_token_ids), "param_init_type": SAMPLE_DTYPE,
            "compute_dtype": "float32", "seq_length": SAMPLE_MAX_LENGTH}


def sample_hf_config(model_config: dict[str, Any]) -> dict[str, Any]:
    """config.json of ``model_config``: mftune's conversion, without a pad id (Llama 3 has none)."""
    config = model_config_to_hf_config(model_config)
    del config["pad_token_id"]
    return config


def random_hf_weights(model_config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """mftune's random initialisation of ``model_config`` under ``seed`` (the caller's RNG is left as it was),
    by Hugging Face name, in the model's ``param_init_type``; a tied lm_head is left out."""
    float32 = {**model_config, "param_init_type": "float32"}  # initialise in float32, store rounded
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig.from_dict(float32))
    dtype = getattr(torch, model_config["param_init_type"])
    return {mftune_to_hf(name): tensor.to(dtype) for name, tensor in unique_state_dict(model).items()}


def build_sample_hf_dir(directory: str, seed: int = 0, records: list[dict] | None = None) -> dict[str, Any]:
    """Write the sample model directory (module docstring) at ``directory``, replacing one that is there;
    returns its config.json. ``records``: the tokenizer's training data (default: the bundled sample)."""
    with atomic_directory(directory) as stage:
        os.makedirs(stage.path)
        tokenizer = write_sample_hf_tokenizer(stage.path, records)
        model_config = sample_model_config(tokenizer)
        config = sample_hf_config(model_config)
        _write_json(os.path.join(stage.path, "config.json"), config)
        _write_json(os.path.join(stage.path, "generation_config.json"),
                    {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": list(tokenizer.eos_token_ids)})
        save_safetensors(random_hf_weights(model_config, seed), os.path.join(stage.path, "model.safetensors"),
                         {"format": "pt"})
    return config


def _write_json(path: str, obj: dict[str, Any]) -> None:
    with atomic_open(path) as f:  # as transformers writes them
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
