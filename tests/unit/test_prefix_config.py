"""pet_config of prefix tuning / P-tuning v2: MindFormers' keys and defaults, every problem reported at once, and what
get_pet_model builds from it (tests/e2e/test_mindformers_prefix.py checks the numerics against MindFormers)."""
from __future__ import annotations

import pytest
import torch

from mftune.models.llama import LlamaForCausalLM
from mftune.pet import PrefixConfig, get_pet_model, pet_config_errors, pet_config_from_dict, trainable_summary

MODEL = dict(seq_length=16, hidden_size=64, num_layers=3, num_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
             compute_dtype="float32", param_init_type="float32")


def test_mindformers_defaults_and_the_two_spellings():
    """Expected: MindFormers' PrefixTuningConfig / Ptuning2Config defaults; prefixtuning is ptuning2 with the
    projection on under other key names."""
    prefix = pet_config_from_dict({"pet_type": "prefixtuning"})
    assert (prefix.num_tokens, prefix.projection, prefix.hidden, prefix.dropout) == (128, True, 512, 0.1)
    p2 = pet_config_from_dict({"pet_type": "PTuning2"})
    assert (p2.pet_type, p2.num_tokens, p2.projection, p2.hidden, p2.dropout) == ("ptuning2", 128, False, 128, 0.01)
    assert p2.compute_torch_dtype == torch.float16 and p2.mark == "mindpet_delta_ptuning2"
    assert "mid_dim" not in p2.to_dict() and "pre_seq_len" not in prefix.to_dict()


def test_every_problem_is_named_with_its_fix():
    errors = pet_config_errors({"pet_type": "ptuning2", "pre_seq_len": 0, "mid_dim": 8, "dropout_prob": 1.0,
                                "prefix_projection": "yes", "compute_dtype": "fp8", "lora_rank": 4})
    assert len(errors) == 6, errors
    assert any("mid_dim=8 is invalid: unknown pet_config key for pet_type ptuning2 (it is prefixtuning's)" in e
               and "projection_dim" in e for e in errors)
    assert any("pre_seq_len=0 is invalid: must be a positive integer" in e for e in errors)
    assert any("dropout_prob=1.0 is invalid: must be a number in [0, 1)" in e for e in errors)
    assert any("prefix_projection='yes' is invalid: must be true or false" in e for e in errors)
    assert any("compute_dtype='fp8' is invalid" in e for e in errors)
    assert any("lora_rank=4 is invalid: unknown pet_config key for pet_type ptuning2" in e for e in errors)
    with pytest.raises(ValueError, match="1 problem"):
        PrefixConfig.from_dict({"pet_type": "prefixtuning", "pre_seq_len": 4})


def test_prefix_is_sized_by_kv_heads_and_only_it_trains():
    """Expected (GQA: 4 heads, 2 KV heads, head_dim 16, 3 layers): a table [P, 2 * 3 * 2 * 16] and the MLP under
    MindFormers' names, the only trainable parameters; the encoder's output has one key and one value per layer."""
    model = LlamaForCausalLM(dict(MODEL))
    get_pet_model(model, {"pet_type": "prefixtuning", "prefix_token_num": 5, "mid_dim": 7})
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"mindpet_delta_prefixtuning_embedding.embedding_table": (5, 192),
                         "mindpet_delta_prefixtuning_trans.0.weight": (7, 192),
                         "mindpet_delta_prefixtuning_trans.0.bias": (7,),
                         "mindpet_delta_prefixtuning_trans.2.weight": (192, 7),
                         "mindpet_delta_prefixtuning_trans.2.bias": (192,)}
    assert model.prefix_encoder(3, False).shape == (3, 5, 6, 2, 16)
    assert "trainable params: 3,847 ||" in trainable_summary(model)
    with pytest.raises(ValueError, match="already applied"):
        get_pet_model(model, {"pet_type": "ptuning2"})


def test_prefix_dropout_masks_each_row_in_training_only():
    model = LlamaForCausalLM(dict(MODEL))
    get_pet_model(model, {"pet_type": "ptuning2", "pre_seq_len": 4, "dropout_prob": 0.5, "compute_dtype": "float32"})
    torch.manual_seed(0)
    train = model.prefix_encoder(2, True)
    assert not torch.equal(train[0], train[1]) and ((train == 0).float().mean() - 0.5).abs() < 0.1
    table = model.mindpet_delta_ptuning2_embedding.embedding_table.view(4, 6, 2, 16)
    kept = train[0] != 0
    torch.testing.assert_close(train[0][kept], (table * 2)[kept])  # inverted dropout: kept values x 1/(1-p)
    assert torch.equal(model.prefix_encoder(2, False)[1], table)
