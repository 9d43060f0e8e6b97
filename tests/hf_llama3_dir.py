"""A tiny Llama 3-style Hugging Face directory as users download them, built with transformers (the
reference): a byte-level BPE tokenizer.json with Llama 3's special tokens and Llama 3 Instruct's chat template
(tests/hf_tokenizer_files.py), rope_theta 500000, llama3 RoPE scaling, GQA, tied embeddings, a list of eos
ids; for the pretrained_model_dir and Python API tests."""
from __future__ import annotations

import torch
import transformers
from hf_tokenizer_files import bpe_directory
from tiny_hf import hf_model

SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 16}


def llama3_style_dir(path: str, dtype: torch.dtype = torch.float32) -> tuple[str, object, object]:
    """``(directory, transformers model in float32 as loaded from it, AutoTokenizer)``. ``dtype``: the
    directory's torch_dtype (a float32 model rounded to it first, so that float32 loads are exact)."""
    directory = bpe_directory(path)
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    model = hf_model(n_kv_heads=2, tie=True, vocab_size=len(tok), rope_theta=500000.0, rope_scaling=SCALING,
                     max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=None)
    model.generation_config = transformers.GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    model.to(dtype).save_pretrained(directory)
    reference = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)  # fp32 RoPE tables
    reference.generation_config = model.generation_config
    return directory, reference.eval(), tok
