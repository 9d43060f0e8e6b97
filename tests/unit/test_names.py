"""HF <-> mftune name and config tables (mftune.checkpoint.names).

Expected names come from reference/mindformers.md §5 and from the state_dict of a real (tiny)
transformers LlamaForCausalLM; expected config values from transformers' own LlamaConfig.
"""
from __future__ import annotations

import pytest

from mftune.checkpoint.names import (
    hf_config_to_model_config,
    hf_to_mftune,
    is_hf_buffer,
    mftune_to_hf,
    model_config_to_hf_config,
)
from mftune.models.llama import LlamaConfig, LlamaForCausalLM

transformers = pytest.importorskip("transformers")

# reference/mindformers.md §5, row by row.
TABLE = [
    ("model.embed_tokens.weight", "model.tok_embeddings.embedding_weight"),
    ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.attention.wq.weight"),
    ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.attention.wk.weight"),
    ("model.layers.0.self_attn.v_proj.weight", "model.layers.0.attention.wv.weight"),
    ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.attention.wo.weight"),
    ("model.layers.17.mlp.gate_proj.weight", "model.layers.17.feed_forward.w1.weight"),
    ("model.layers.17.mlp.down_proj.weight", "model.layers.17.feed_forward.w2.weight"),
    ("model.layers.17.mlp.up_proj.weight", "model.layers.17.feed_forward.w3.weight"),
    ("model.layers.79.input_layernorm.weight", "model.layers.79.attention_norm.weight"),
    ("model.layers.79.post_attention_layernorm.weight", "model.layers.79.ffn_norm.weight"),
    ("model.norm.weight", "model.norm_out.weight"),
    ("lm_head.weight", "lm_head.weight"),
]


@pytest.mark.parametrize("hf, mf", TABLE)
def test_table_and_round_trip(hf: str, mf: str) -> None:
    assert hf_to_mftune(hf) == mf
    assert mftune_to_hf(mf) == hf
    assert mftune_to_hf(hf_to_mftune(hf)) == hf


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.self_attn.rotary_emb.inv_freq",  # a buffer, not a weight
        "model.layers.0.attention.wq.weight",  # an mftune name given to the HF direction
        "model.layers.x.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "embed_tokens.weight",
        "",
    ],
)
def test_unknown_hf_name_is_a_key_error_naming_it(name: str) -> None:
    with pytest.raises(KeyError, match=repr(name).replace(".", r"\.")):
        hf_to_mftune(name)


@pytest.mark.parametrize(
    "name",
    ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.attention.wq.mindpet_delta_lora_a",
     "model.tok_embeddings.weight", "lm_head.bias"],
)
def test_unknown_mftune_name_is_a_key_error_naming_it(name: str) -> None:
    with pytest.raises(KeyError, match=repr(name).replace(".", r"\.")):
        mftune_to_hf(name)


def test_hf_buffer_names() -> None:
    assert is_hf_buffer("model.layers.3.self_attn.rotary_emb.inv_freq")
    assert not is_hf_buffer("model.layers.3.self_attn.q_proj.weight")


def _hf_config(**overrides) -> "transformers.LlamaConfig":
    kwargs = dict(vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=50000.0,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


@pytest.mark.parametrize("tie", [False, True])
def test_real_hf_state_dict_maps_onto_mftune_state_dict(tie: bool) -> None:
    hf_cfg = _hf_config(tie_word_embeddings=tie)
    hf = transformers.LlamaForCausalLM(hf_cfg)
    mc = hf_config_to_model_config(hf_cfg.to_dict())
    ours = LlamaForCausalLM(mc)
    hf_sd, our_sd = hf.state_dict(), ours.state_dict()
    mapped = {hf_to_mftune(k): k for k in hf_sd if not is_hf_buffer(k)}
    assert len(mapped) == len(hf_sd)  # the mapping is injective
    assert set(mapped) == set(our_sd)
    for mf, hf_name in mapped.items():
        assert our_sd[mf].shape == hf_sd[hf_name].shape, mf
    assert {mftune_to_hf(k) for k in our_sd} == set(hf_sd)


def test_hf_config_to_model_config_values() -> None:
    hf = _hf_config().to_dict()  # transformers 5 writes rope_parameters / dtype
    mc = hf_config_to_model_config(hf)
    assert mc["hidden_size"] == 32 and mc["intermediate_size"] == 80 and mc["num_layers"] == 3
    assert mc["num_heads"] == 4 and mc["n_kv_heads"] == 2 and mc["vocab_size"] == 96
    assert mc["rms_norm_eps"] == 1e-6 and mc["theta"] == 50000.0
    assert mc["max_position_embedding"] == 128 and mc["seq_length"] == 128
    assert (mc["bos_token_id"], mc["eos_token_id"], mc["pad_token_id"]) == (1, 2, 0)
    assert mc["tie_word_embeddings"] is False
    assert LlamaConfig(**mc).ffn_hidden_size == 80


def test_hf_config_legacy_keys() -> None:
    """transformers 4 config.json (the Llama-2-7b-hf file's key names)."""
    legacy = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "rope_scaling": None, "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": None, "tie_word_embeddings": False, "torch_dtype": "float16", "hidden_act": "silu"}
    mc = hf_config_to_model_config(legacy)
    assert mc["param_init_type"] == "float16" and "pad_token_id" not in mc  # None -> LlamaConfig default
    assert mc["theta"] == 10000.0 and "extend_method" not in mc
    linear = hf_config_to_model_config({**legacy, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert (linear["extend_method"], linear["scaling_factor"]) == ("PI", 4.0)


def test_hf_config_round_trip_through_transformers() -> None:
    mc = dict(hidden_size=32, intermediate_size=80, num_layers=3, num_heads=4, n_kv_heads=2, vocab_size=96,
              rms_norm_eps=1e-6, theta=50000.0, max_position_embedding=128, seq_length=128, bos_token_id=1,
              eos_token_id=2, pad_token_id=0, tie_word_embeddings=True, initializer_range=0.02,
              param_init_type="bfloat16", extend_method="PI", scaling_factor=2.0)
    hf = model_config_to_hf_config(mc)
    assert hf["model_type"] == "llama" and hf["architectures"] == ["LlamaForCausalLM"]
    assert hf["torch_dtype"] == "bfloat16" and hf["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert hf_config_to_model_config(hf) == {**mc, "mask_pad_token": False}  # HF semantics for pad ids
    # transformers accepts the file and reads the same values (via its own config class).
    t = transformers.LlamaConfig(**hf)
    assert t.rope_parameters["rope_theta"] == 50000.0 and t.rope_parameters["factor"] == 2.0
    assert hf_config_to_model_config(t.to_dict()) == {**mc, "mask_pad_token": False}


def test_model_config_to_hf_resolves_ffn_rule() -> None:
    hf = model_config_to_hf_config({"hidden_size": 4096, "num_heads": 32, "num_layers": 32})
    assert hf["intermediate_size"] == 11008 and hf["num_key_value_heads"] == 32 and hf["rope_scaling"] is None


@pytest.mark.parametrize(
    "bad, key",
    [({"attention_bias": True}, "attention_bias"), ({"hidden_act": "gelu"}, "hidden_act"),
     ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"), ({"model_type": "mistral"}, "mistral"),
     ({"head_dim": 32}, "head_dim")],
)
def test_hf_config_unsupported_features_are_errors(bad: dict, key: str) -> None:
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1, "vocab_size": 32}
    with pytest.raises(ValueError, match=key):
        hf_config_to_model_config({**base, **bad})


def test_ntk_cannot_be_exported() -> None:
    with pytest.raises(ValueError, match="NTK"):
        model_config_to_hf_config({"hidden_size": 64, "num_heads": 4, "extend_method": "NTK", "scaling_factor": 2.0})
