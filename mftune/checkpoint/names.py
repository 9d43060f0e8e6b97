"""Hugging Face <-> mftune (MindFormers) name and config translation: explicit tables, pure functions.

All name translation lives here (STYLE #6). Names follow reference/mindformers.md §5: the layouts are
identical (rotate-half RoPE, Linear weights ``[out, in]``), so converting weights is a rename with no
reshaping and no q/k permutation. Unknown names are a ``KeyError`` naming them, never a pass-through.
"""
from __future__ import annotations

import re
from typing import Any

from mftune.models.config import DTYPES, LLAMA3_SCALING_KEYS, LlamaConfig, rope_method

# Names outside the decoder layers.
HF_TO_MFTUNE_TOP: dict[str, str] = {
    "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
    "model.norm.weight": "model.norm_out.weight",
    "lm_head.weight": "lm_head.weight",
}

# Names inside ``model.layers.{i}.``.
HF_TO_MFTUNE_LAYER: dict[str, str] = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}

MFTUNE_TO_HF_TOP: dict[str, str] = {v: k for k, v in HF_TO_MFTUNE_TOP.items()}
MFTUNE_TO_HF_LAYER: dict[str, str] = {v: k for k, v in HF_TO_MFTUNE_LAYER.items()}

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Non-persistent buffers that older transformers versions saved; they carry no weights.
HF_BUFFER = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def _translate(name: str, top: dict[str, str], layer: dict[str, str], direction: str) -> str:
    if name in top:
        return top[name]
    m = _LAYER.match(name)
    if m and m.group(2) in layer:
        return f"model.layers.{m.group(1)}.{layer[m.group(2)]}"
    raise KeyError(f"{direction}: unknown parameter name {name!r} (no entry in mftune.checkpoint.names)")


def hf_to_mftune(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``model.layers.3.attention.wq.weight``; KeyError if unknown."""
    return _translate(name, HF_TO_MFTUNE_TOP, HF_TO_MFTUNE_LAYER, "hf_to_mftune")


def mftune_to_hf(name: str) -> str:
    """``model.layers.3.attention.wq.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; KeyError if unknown."""
    return _translate(name, MFTUNE_TO_HF_TOP, MFTUNE_TO_HF_LAYER, "mftune_to_hf")


def is_hf_buffer(name: str) -> bool:
    """True for HF state_dict entries that are buffers, not weights (``rotary_emb.inv_freq``): skip them."""
    return bool(HF_BUFFER.match(name))


# ----------------------------------------------------------------------------------------------
# config.json <-> model_config
# ----------------------------------------------------------------------------------------------

# HF config.json key -> LlamaConfig key, copied as they are.
HF_TO_MODEL_CONFIG: dict[str, str] = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "n_kv_heads",
    "vocab_size": "vocab_size",
    "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embedding",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "tie_word_embeddings": "tie_word_embeddings",
    "initializer_range": "initializer_range",
}

# transformers' LlamaConfig default (4.x and 5.x) for a config.json without max_position_embeddings: the
# original context length its dynamic RoPE then scales from
HF_DEFAULT_MAX_POSITION_EMBEDDINGS = 2048

# Accepted dtype name -> its long name ("bf16" -> "bfloat16"), from the model's table (one source).
_DTYPE_NAMES = {name: str(dtype).removeprefix("torch.") for name, dtype in DTYPES.items()}


def _rope(hf: dict[str, Any]) -> tuple[float | None, dict[str, Any] | None]:
    """(rope_theta, scaling dict) from either the transformers 4 keys or 5's ``rope_parameters``."""
    params = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", params.get("rope_theta"))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    return theta, scaling


def hf_config_to_model_config(hf: dict[str, Any]) -> dict[str, Any]:
    """HF Llama ``config.json`` -> ``model.model_config`` keys (``LlamaConfig(**result)`` works).

    ``seq_length`` defaults to ``max_position_embeddings`` (a YAML value overlaid later wins);
    ``torch_dtype`` (or 5.x ``dtype``) becomes ``param_init_type``; RoPE scaling (``_rope_scaling``):
    ``linear`` -> ``extend_method: PI``, ``dynamic`` -> ``DYNAMIC_NTK``, ``llama3`` -> ``LLAMA3``.
    Features mftune's model cannot represent are a ValueError naming the key.
    """
    errors = []
    if hf.get("model_type", "llama") != "llama":
        errors.append(f"model_type={hf['model_type']!r} is invalid: only 'llama' converts.")
    if hf.get("hidden_act", "silu") != "silu":
        errors.append(f"hidden_act={hf['hidden_act']!r} is invalid: Llama uses 'silu'.")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            errors.append(f"{key}={hf[key]!r} is invalid: mftune's Llama has no biases.")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        errors.append(f"head_dim={head_dim} is invalid: mftune needs head_dim == hidden_size / num_attention_heads.")
    mc: dict[str, Any] = {dst: hf[src] for src, dst in HF_TO_MODEL_CONFIG.items() if hf.get(src) is not None}
    mc["mask_pad_token"] = False  # transformers hides padding by attention_mask, never by token id
    if "max_position_embedding" in mc:
        mc["seq_length"] = mc["max_position_embedding"]
    theta, scaling = _rope(hf)
    if theta is not None:
        mc["theta"] = float(theta)
    if scaling:
        errors += _rope_scaling(hf, scaling, mc)
    dtype = hf.get("torch_dtype", hf.get("dtype"))
    if dtype is not None:
        if str(dtype) not in _DTYPE_NAMES:
            errors.append(f"torch_dtype={dtype!r} is invalid: expected one of {sorted(set(_DTYPE_NAMES.values()))}.")
        else:
            mc["param_init_type"] = _DTYPE_NAMES[str(dtype)]
    if errors:
        raise ValueError("cannot convert HF config:\n  " + "\n  ".join(errors))
    return mc


def _rope_scaling(hf: dict[str, Any], scaling: dict[str, Any], mc: dict[str, Any]) -> list[str]:
    """``rope_scaling`` (or ``rope_parameters``) into ``mc``'s extend_method / scaling_factor; the errors.

    ``dynamic``: the original context length is config.json's ``max_position_embeddings`` (mc's
    ``max_position_embedding``), which transformers 4.x and 5.x read for it (an
    ``original_max_position_embeddings`` in the dict is ignored by both, and here).
    """
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ("linear", "dynamic") and not (isinstance(scaling.get("factor"), (int, float))
                                              and not isinstance(scaling.get("factor"), bool)):
        return [f"rope_scaling factor={scaling.get('factor')!r} is invalid: rope_type {kind!r} needs a number."]
    if kind == "linear":
        mc["extend_method"], mc["scaling_factor"] = "PI", float(scaling["factor"])
    elif kind == "dynamic":
        mc["extend_method"], mc["scaling_factor"] = "DYNAMIC_NTK", float(scaling["factor"])
        mc.setdefault("max_position_embedding", HF_DEFAULT_MAX_POSITION_EMBEDDINGS)
    elif kind == "llama3":
        mc["extend_method"] = "LLAMA3"
        scaling = {"original_max_position_embeddings": hf.get("max_position_embeddings"), **scaling}
        mc["scaling_factor"] = {k: scaling[k] for k in LLAMA3_SCALING_KEYS if scaling.get(k) is not None}
    elif kind not in (None, "default"):
        return [f"rope_scaling type={kind!r} is invalid: only 'linear' (extend_method PI), 'dynamic' "
                f"(extend_method DYNAMIC_NTK) and 'llama3' (extend_method LLAMA3) convert."]
    return []


def model_config_to_hf_config(mc: dict[str, Any]) -> dict[str, Any]:
    """``model.model_config`` -> HF Llama ``config.json`` (transformers 4 key names; 5.x reads them too).

    ``intermediate_size`` is the resolved FFN size (the Llama2 rule unless given); ``torch_dtype`` is
    ``param_init_type``. ``extend_method: NTK`` is a ValueError: HF only has *dynamic* NTK (DYNAMIC_NTK),
    which gives other frequencies.
    """
    cfg = LlamaConfig.from_dict(mc)
    method = rope_method(cfg.extend_method)
    if method == "NTK":
        raise ValueError("extend_method='NTK' is invalid for HF export: HF has no static NTK RoPE. Use PI or None.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": float(cfg.theta),
        "rope_scaling": _hf_rope_scaling(method, cfg.scaling_factor),
        "max_position_embeddings": cfg.max_position_embedding,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "torch_dtype": _DTYPE_NAMES[str(cfg.param_init_type).lower()],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }


def _hf_rope_scaling(method: str, scaling_factor: Any) -> dict[str, Any] | None:
    """config.json's ``rope_scaling`` of extend_method PI (linear), DYNAMIC_NTK (dynamic; its original length
    is ``max_position_embeddings``) or LLAMA3 (llama3); None otherwise. ``rope_type`` is what transformers
    >= 4.43 and 5.x read (both also take the older ``type``; 4.42 and older want ``type`` and ``factor`` alone)."""
    if method == "PI":
        return {"rope_type": "linear", "factor": float(scaling_factor)}
    if method == "DYNAMIC_NTK":
        return {"rope_type": "dynamic", "factor": float(scaling_factor)}
    if method == "LLAMA3":
        return {"rope_type": "llama3", **{k: scaling_factor[k] for k in LLAMA3_SCALING_KEYS}}
    return None
