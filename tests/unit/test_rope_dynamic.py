"""``extend_method: DYNAMIC_NTK``: transformers' ``rope_type: dynamic`` (dynamic NTK RoPE).

Where each expected value comes from: transformers' ``LlamaForCausalLM`` (its ``dynamic_rope_update`` /
``_compute_dynamic_ntk_parameters``) with the same weights, built by tests/tiny_hf.py with an original
context (``max_position_embeddings``) of 16, so that inputs longer than 16 take the scaled branch. A new
transformers model is built for every reference call: its rotary module is stateful (``ORIGINAL`` below).
"""
from __future__ import annotations

import pytest
import torch
import transformers
from tiny_hf import VOCAB, hf_model, mftune_from_hf

from mftune.checkpoint.names import hf_config_to_model_config, model_config_to_hf_config
from mftune.checkpoint.recorded_config import mismatches
from mftune.generation import generate
from mftune.models.attention import KVCache
from mftune.models.config import LlamaConfig, model_args, model_config_errors
from mftune.models.llama import LlamaForCausalLM
from mftune.models.rope import inv_freq

ORIGINAL = 16  # max_position_embeddings: the original context the dynamic base scales from
DYNAMIC = {"rope_type": "dynamic", "factor": 2.0}
PAD = 0


def dynamic_hf(factor: float = 2.0) -> "transformers.LlamaForCausalLM":
    """A fresh tiny transformers Llama (GQA, hidden 64, 2 layers) with dynamic NTK RoPE."""
    return hf_model(2, rope_scaling={**DYNAMIC, "factor": factor}, max_position_embeddings=ORIGINAL)


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- forward

@pytest.mark.parametrize("length,scaled", [(40, True), (17, True), (ORIGINAL, False), (12, False)])
def test_logits_match_transformers(length: int, scaled: bool) -> None:
    """One forward of ``length`` tokens: logits within 1e-5 (fp32), the frequencies bit for bit; the
    scaled branch is taken exactly when the input is longer than the original context."""
    hf = dynamic_hf()
    ours = mftune_from_hf(hf)
    assert (ours.config.extend_method, ours.config.scaling_factor) == ("DYNAMIC_NTK", 2.0)
    assert ours.args.max_position_embedding == ORIGINAL
    x = tokens(2, length)
    with torch.no_grad():
        expected = hf(x).logits
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        plain = mftune_from_hf(hf_model(2, max_position_embeddings=ORIGINAL))(x)
    freqs = inv_freq(ours.args, torch.device("cpu"), length)
    assert torch.equal(freqs, hf.model.rotary_emb.inv_freq)  # what transformers used for this call
    assert torch.equal(freqs, inv_freq(ours.args, torch.device("cpu"))) is not scaled
    if scaled:
        assert not torch.allclose(expected, plain, atol=1e-3)  # the dynamic base changes the logits
    else:
        torch.testing.assert_close(expected, plain, atol=1e-6, rtol=1e-6)


def test_left_padded_batch_takes_the_length_from_the_largest_position() -> None:
    """Rows of 24 and 13 real tokens, left padded: the call's length is max(position) + 1 = 24 for both
    rows (transformers' ``torch.max(position_ids) + 1``), given the same positions and attention mask."""
    hf = dynamic_hf()
    ours = mftune_from_hf(hf)
    x = tokens(2, 24, seed=3)
    mask = torch.ones_like(x)
    mask[1, :11] = 0
    x[1, :11] = PAD
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(x, attention_mask=mask, position_ids=positions).logits
        got = ours(x, positions=positions, attention_mask=mask, cache=KVCache(2, 24))
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)


def test_transformers_keeps_the_longest_frequencies_mftune_computes_per_call() -> None:
    """The documented difference: after a 40-token call, transformers' rotary module keeps the
    frequencies of length 40 for a 24-token call (16 <= 24 < 40); mftune gives what a fresh transformers
    model gives. Below the original length both are back to the plain frequencies."""
    used = dynamic_hf()
    ours = mftune_from_hf(used)
    x24, x12 = tokens(1, 24, seed=1), tokens(1, 12, seed=2)
    with torch.no_grad():
        used(tokens(1, 40))
        stale = used(x24).logits
        fresh = dynamic_hf()(x24).logits
        torch.testing.assert_close(ours(x24), fresh, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(stale, fresh, atol=1e-4)
        torch.testing.assert_close(ours(x12), used(x12).logits, atol=1e-5, rtol=1e-5)  # transformers reset


# ---------------------------------------------------------------------------------------------- generation

def hf_greedy(batch: list[list[int]], new: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """A fresh transformers model's greedy ``generate`` on the left-padded batch: ids and per-step logits."""
    width = max(len(p) for p in batch)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    with torch.no_grad():
        out = dynamic_hf().generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                    num_beams=1, pad_token_id=PAD, eos_token_id=None, output_logits=True,
                                    return_dict_in_generate=True)
    return out.sequences[:, width:].tolist(), list(out.logits)


def cached_logits(model: LlamaForCausalLM, batch: list[list[int]], chosen: list[list[int]]) -> list[torch.Tensor]:
    """mftune's last-position logits per decode step with the KV cache, fed ``chosen`` tokens (as
    ``mftune.generation.generate`` feeds them: positions ``cumsum(mask) - 1``, then + 1 per step)."""
    width = max(len(p) for p in batch)
    feed = torch.tensor([[PAD] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    positions, cache, steps = (mask.cumsum(-1) - 1).clamp(min=0), KVCache(2, width + len(chosen[0])), []
    with torch.no_grad():
        for step in range(len(chosen[0])):
            steps.append(model(feed, positions=positions, attention_mask=mask, cache=cache, last_only=True)[:, -1])
            feed, positions = torch.tensor([[row[step]] for row in chosen]), positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return steps


@pytest.mark.parametrize("lengths,new", [((10, 7), 14), ((20, 13), 8)])
def test_cached_greedy_generation_matches_transformers(lengths: tuple[int, int], new: int) -> None:
    """Prompt + new tokens crossing the original length (16) during decoding, or already in the prompt:
    mftune's greedy tokens equal transformers' ``generate`` token for token, and each step's logits
    (the KV cache holding keys rotated at earlier steps' frequencies, as transformers' does) within 1e-5."""
    g = torch.Generator().manual_seed(5)
    batch = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
    expected, expected_logits = hf_greedy(batch, new)
    ours = mftune_from_hf(dynamic_hf())
    assert generate(ours, batch, max_new_tokens=new, eos_token_id=None, pad_token_id=PAD) == expected
    for got, want in zip(cached_logits(ours, batch, expected), expected_logits):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    plain = mftune_from_hf(hf_model(2, max_position_embeddings=ORIGINAL))
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(cached_logits(plain, batch, expected),
                                                                     expected_logits))  # the test can fail


# ---------------------------------------------------------------------------------------------- config

SIZES = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1, "vocab_size": 32, "rope_theta": 10000.0}


@pytest.mark.parametrize("spelling", [
    {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},  # transformers >= 4.43
    {"rope_scaling": {"type": "dynamic", "factor": 2.0}},  # transformers 4.31 - 4.42
    {"rope_scaling": {"type": "dynamic", "rope_type": "dynamic", "factor": 2.0}},  # 4.43+ re-saving a 4.42 config
    {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},  # transformers 5
])
def test_hf_config_round_trip(spelling: dict) -> None:
    mc = hf_config_to_model_config({**SIZES, "max_position_embeddings": 4096, **spelling})
    assert (mc["extend_method"], mc["scaling_factor"], mc["max_position_embedding"]) == ("DYNAMIC_NTK", 2.0, 4096)
    hf = model_config_to_hf_config(mc)
    assert hf["rope_scaling"] == {"rope_type": "dynamic", "factor": 2.0} and hf["max_position_embeddings"] == 4096
    t = transformers.LlamaConfig(**hf)  # transformers reads it back (5.x: as rope_parameters)
    assert t.rope_parameters["rope_type"] == "dynamic" and t.rope_parameters["factor"] == 2.0
    rope = ("extend_method", "scaling_factor", "max_position_embedding", "theta")
    for back in (hf_config_to_model_config(t.to_dict()), hf_config_to_model_config(hf)):
        assert {k: back[k] for k in rope} == {k: mc[k] for k in rope}


def test_hf_config_without_max_position_embeddings_uses_transformers_default() -> None:
    """transformers' LlamaConfig defaults max_position_embeddings to 2048: the original length it scales from."""
    mc = hf_config_to_model_config({**SIZES, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}})
    assert mc["max_position_embedding"] == transformers.LlamaConfig().max_position_embeddings == 2048
    with pytest.raises(ValueError, match="factor=None is invalid"):
        hf_config_to_model_config({**SIZES, "rope_scaling": {"rope_type": "dynamic"}})


@pytest.mark.parametrize("factor", [0, 0.0, -2.0, True])
def test_factor_must_be_a_positive_number(factor) -> None:
    (err,) = model_config_errors(LlamaConfig(hidden_size=64, num_heads=4, extend_method="DYNAMIC_NTK",
                                             scaling_factor=factor))
    assert err.startswith(f"scaling_factor={factor!r} is invalid: must be > 0") and "scaling_factor: 2.0" in err


def test_config_checks_and_names() -> None:
    base = dict(hidden_size=64, num_heads=4, num_layers=1, vocab_size=32, seq_length=64)
    assert model_config_errors(LlamaConfig(**base, extend_method="dynamic_ntk", scaling_factor=2.0)) == []
    args = model_args(LlamaConfig(**base, extend_method="dynamic_ntk", scaling_factor=2.0))
    assert (args.extend_method, args.max_position_embedding) == ("DYNAMIC_NTK", 64)  # None: seq_length
    assert model_args(LlamaConfig(**base, max_position_embedding=32)).max_position_embedding is None
    (err,) = model_config_errors(LlamaConfig(**base, extend_method="DYNAMIC_NTK", scaling_factor=2.0,
                                             max_position_embedding=0))
    assert err.startswith("max_position_embedding=0 is invalid") and "DYNAMIC_NTK" in err
    (err,) = model_config_errors(LlamaConfig(**base, extend_method="DYNAMIC_NTK", scaling_factor={"factor": 2.0}))
    assert "a mapping is for extend_method LLAMA3" in err
    (err,) = model_config_errors(LlamaConfig(**base, extend_method="YARN"))
    assert err.startswith("extend_method='YARN'") and "DYNAMIC_NTK" in err


def test_original_length_is_compared_only_with_dynamic_ntk() -> None:
    """A run whose max_position_embedding differs from the checkpoint's (config.json's) builds another
    dynamic-NTK model: reported like any architecture key. Without DYNAMIC_NTK it changes nothing."""
    recorded = hf_config_to_model_config({**SIZES, "max_position_embeddings": 16, "rope_scaling": DYNAMIC})
    run = LlamaConfig(**{**recorded, "max_position_embedding": 4096})
    assert mismatches(recorded, run) == [("max_position_embedding", 4096, 16)]
    plain = hf_config_to_model_config({**SIZES, "max_position_embeddings": 16})
    assert mismatches(plain, LlamaConfig(**{**plain, "max_position_embedding": 4096})) == []
