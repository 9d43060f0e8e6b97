"""mftune.generation and the KV cache against transformers (STYLE #8).

Where each expected value comes from: transformers' ``LlamaForCausalLM.generate`` on the same weights
(greedy and seeded sampling, left-padded batches), transformers' logits processors on the same
random logits, mftune's own full (uncached) forward, which tests/unit/test_model.py checks against
transformers, and the unmerged LoRA model, which tests/unit/test_lora.py checks against peft.
"""
from __future__ import annotations

import pytest
import torch

import tiny_hf
from mftune.generation import (
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    generate,
    max_new_tokens_for,
    process_logits,
)
from mftune.models.attention import KVCache
from mftune.pet import get_pet_model, lora_layers, merge_lora

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

VOCAB, HIDDEN, HEADS, LAYERS, FFN, PAD = 128, 64, 4, 2, 96, 0
PROMPT_LENGTHS = (3, 9, 6)  # different lengths: rows 0 and 2 are left padded in a batch


def hf_model(n_kv_heads: int = HEADS, seed: int = 0) -> "transformers.LlamaForCausalLM":
    """The shared tiny transformers Llama (tests/tiny_hf.py), all heads by default, untied."""
    return tiny_hf.hf_model(n_kv_heads=n_kv_heads, seed=seed)


mftune_from_hf = tiny_hf.mftune_from_hf


def prompts(seed: int = 1) -> list[list[int]]:
    """Random prompts of PROMPT_LENGTHS tokens, ids 3.. (never the pad id 0 nor the eos ids used below)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def hf_generate(hf, batch: list[list[int]], eos: int | None, **kwargs) -> list[list[int]]:
    """transformers' generate on a left-padded batch; generated ids per row, cut after the first eos."""
    width = max(len(p) for p in batch)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, num_beams=1, pad_token_id=PAD,
                          eos_token_id=eos, **kwargs)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos is not None and eos in row else row)
    return rows


# (a) greedy equals transformers -----------------------------------------------------------------------

@pytest.mark.parametrize("n_kv_heads,repetition_penalty", [(HEADS, 1.0), (2, 1.0), (HEADS, 1.3)])
def test_greedy_matches_transformers(n_kv_heads: int, repetition_penalty: float) -> None:
    """Expected: transformers' greedy ``generate`` on the same left-padded batch, token for token,
    including where each row stops on eos (eos picked from the output so that one row stops early)."""
    hf = hf_model(n_kv_heads)
    model = mftune_from_hf(hf)
    batch, new = prompts(), 12
    free = hf_generate(hf, batch, eos=None, max_new_tokens=new, do_sample=False,
                       repetition_penalty=repetition_penalty)
    assert free == generate(model, batch, max_new_tokens=new, eos_token_id=None, pad_token_id=PAD,
                            repetition_penalty=repetition_penalty)
    # eos = the first token row 0 emits for the first time after step 0: row 0 stops early there.
    stop = next(t for t in range(1, new) if free[0][t] not in free[0][:t])
    eos = free[0][stop]
    ref = hf_generate(hf, batch, eos=eos, max_new_tokens=new, do_sample=False, repetition_penalty=repetition_penalty)
    ours = generate(model, batch, max_new_tokens=new, eos_token_id=eos, pad_token_id=PAD,
                    repetition_penalty=repetition_penalty)
    assert ours == ref
    assert len(ours[0]) == stop + 1 < new and ours[0][-1] == eos


def test_padded_row_equals_row_alone() -> None:
    """Expected: the row generated alone (no padding). Padding must not move positions or leak into attention."""
    model = mftune_from_hf(hf_model())
    batch = prompts()
    together = generate(model, batch, max_new_tokens=8, eos_token_id=None, pad_token_id=PAD)
    alone = [generate(model, [p], max_new_tokens=8, eos_token_id=None, pad_token_id=PAD)[0] for p in batch]
    assert together == alone


def test_per_row_budgets_from_max_decode_length() -> None:
    """MindFormers' max_decode_length counts the prompt: row i gets max_decode_length - len(prompt_i) tokens."""
    model = mftune_from_hf(hf_model())
    batch = prompts()
    budgets = max_new_tokens_for(batch, max_decode_length=12)
    assert budgets == [12 - n for n in PROMPT_LENGTHS]
    out = generate(model, batch, max_new_tokens=budgets, eos_token_id=None, pad_token_id=PAD)
    assert [len(p) + len(o) for p, o in zip(batch, out)] == [12, 12, 12]
    full = generate(model, batch, max_new_tokens=max(budgets), eos_token_id=None, pad_token_id=PAD)
    assert out == [f[:b] for f, b in zip(full, budgets)]
    with pytest.raises(ValueError, match="max_decode_length=9 is invalid: prompt 1 has 9 tokens"):
        max_new_tokens_for(batch, max_decode_length=9)


# (b) cached decoding equals the full forward ----------------------------------------------------------

@pytest.mark.parametrize("n_kv_heads", [HEADS, 2])
def test_cached_logits_match_full_forward(n_kv_heads: int) -> None:
    """Expected: the uncached forward over the whole sequence (itself checked against transformers)."""
    model = mftune_from_hf(hf_model(n_kv_heads))
    x = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(x)  # (2, 10, vocab)
        cache = KVCache(LAYERS, max_len=10)
        pieces = [model(x[:, :4], cache=cache)]  # prefill 4, then one token at a time
        pieces += [model(x[:, t:t + 1], cache=cache) for t in range(4, 10)]
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cached_bf16_compute_close_to_full_forward() -> None:
    """bf16 autocast: the cache holds bf16 keys/values and cached logits stay within bf16 rounding of the
    full forward (expected values: the uncached bf16 forward; different matmul shapes round differently)."""
    model = mftune_from_hf(hf_model(), compute_dtype="bfloat16")
    x = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, cache = model.eval()(x), KVCache(LAYERS, max_len=10)
        pieces = [model(x[:, :4], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(4, 10)]
        cached = torch.cat(pieces, dim=1)
    assert cache.k[0].dtype == torch.bfloat16
    torch.testing.assert_close(cached, full, rtol=0, atol=5e-2)


def test_cached_left_padded_logits_match_unpadded_forward() -> None:
    """Expected: each row's full forward without padding; the padded, cached batch must give the same logits."""
    model = mftune_from_hf(hf_model(2))
    seqs = prompts(seed=5)
    width = max(map(len, seqs))
    ids = torch.tensor([[PAD] * (width - len(s)) + s for s in seqs])
    valid = ids != PAD
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = KVCache(LAYERS, max_len=width)
        prefill = model(ids[:, :-1], positions=positions[:, :-1], attention_mask=valid[:, :-1], cache=cache)
        last = model(ids[:, -1:], positions=positions[:, -1:], attention_mask=valid, cache=cache)
        for row, s in enumerate(seqs):
            alone = model(torch.tensor([s]))[0]  # (len, vocab)
            got = torch.cat([prefill[row], last[row]])[width - len(s):]
            torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="KVCache holds 9 positions"):
        model(ids[:, :1], cache=cache)


PREFIX = {"pet_type": "prefixtuning", "prefix_token_num": 3, "mid_dim": 8, "dropout_rate": 0.0}


def prefixed(n_kv_heads: int = 2):
    """The tiny model with a prefix far from its small initialisation (MindFormers' float16 prefix math)."""
    model = mftune_from_hf(hf_model(n_kv_heads))
    get_pet_model(model, PREFIX)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mindpet_delta" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def test_prefix_cached_and_left_padded_decoding_match_the_full_forward() -> None:
    """Prefix tuning (docs/pet.md): the cache holds the real tokens only and the prefix is put before them at every
    step. Expected: the uncached forward (the cached logits), each row alone (a padded batch: the prefix positions
    are not shifted by padding), and a prefix that changes the greedy output (so both comparisons bite)."""
    model = prefixed()
    x = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, cache = model(x), KVCache(LAYERS, max_len=10)
        pieces = [model(x[:, :4], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(4, 10)]
    assert cache.length == 10 and cache.prefix is not None and cache.k[0].shape[2] == 10
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    batch = prompts()
    together = generate(model, batch, max_new_tokens=8, eos_token_id=None, pad_token_id=PAD)
    assert together == [generate(model, [p], max_new_tokens=8, eos_token_id=None, pad_token_id=PAD)[0] for p in batch]
    assert together != generate(mftune_from_hf(hf_model(2)), batch, max_new_tokens=8, eos_token_id=None,
                                pad_token_id=PAD)


def test_cache_and_labels_are_exclusive() -> None:
    model = mftune_from_hf(hf_model())
    x = torch.ones(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="labels and cache are exclusive"):
        model(x, labels=x, cache=KVCache(LAYERS, 8))


# (c) LoRA: unmerged generation equals merged ----------------------------------------------------------

def test_lora_unmerged_equals_merged() -> None:
    """Expected: the merged model's tokens (merge is checked against peft in tests/unit/test_lora.py).
    The model is left in train mode with LoRA dropout on: generate must run it in eval mode."""
    model = mftune_from_hf(hf_model())
    batch = prompts()
    base = generate(model, batch, max_new_tokens=10, eos_token_id=None, pad_token_id=PAD)
    get_pet_model(model, dict(lora_rank=4, lora_alpha=8, lora_dropout=0.3, target_modules=".*wq|.*wk|.*wv|.*wo"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.mindpet_delta_lora_a.copy_(torch.randn(layer.mindpet_delta_lora_a.shape, generator=g) * 0.3)
            layer.mindpet_delta_lora_b.copy_(torch.randn(layer.mindpet_delta_lora_b.shape, generator=g) * 0.3)
    model.train()
    unmerged = generate(model, batch, max_new_tokens=10, eos_token_id=None, pad_token_id=PAD)
    assert model.training, "generate gives the model its mode back"
    assert unmerged != base, "the adapters must change the output for the test to bite"
    merge_lora(model)
    assert generate(model, batch, max_new_tokens=10, eos_token_id=None, pad_token_id=PAD) == unmerged


# (d) sampling and logits processors -------------------------------------------------------------------

def test_sampling_reproducible_and_top_k_1_is_greedy() -> None:
    """Same generator seed -> same tokens; another seed -> other tokens; top_k=1 sampling = greedy."""
    model = mftune_from_hf(hf_model())
    batch = prompts()
    kw = dict(max_new_tokens=10, eos_token_id=None, pad_token_id=PAD, do_sample=True, temperature=1.5)
    a = generate(model, batch, generator=torch.Generator().manual_seed(0), **kw)
    b = generate(model, batch, generator=torch.Generator().manual_seed(0), **kw)
    c = generate(model, batch, generator=torch.Generator().manual_seed(1), **kw)
    assert a == b and a != c
    greedy = generate(model, batch, max_new_tokens=10, eos_token_id=None, pad_token_id=PAD)
    assert generate(model, batch, generator=torch.Generator().manual_seed(0), top_k=1, **kw) == greedy


def test_sampling_matches_transformers_under_the_same_seed() -> None:
    """Expected: transformers' ``generate(do_sample=True)`` after ``torch.manual_seed``: with equal processed
    scores both draw one ``torch.multinomial`` per step from the global RNG, so the tokens agree."""
    hf = hf_model()
    model = mftune_from_hf(hf)
    batch = prompts()
    settings = dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.8, repetition_penalty=1.2)
    torch.manual_seed(123)
    ref = hf_generate(hf, batch, eos=None, max_new_tokens=10, **settings)
    torch.manual_seed(123)
    ours = generate(model, batch, max_new_tokens=10, eos_token_id=None, pad_token_id=PAD, **settings)
    assert ours == ref


def random_scores_and_history(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (4, vocab) with negative and positive entries, and left-padded token histories (4, 12)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(4, VOCAB, generator=g) * 3
    history = torch.randint(0, VOCAB, (4, 12), generator=g)
    pad_lengths = torch.tensor([0, 3, 7, 11])
    history[torch.arange(12)[None, :] < pad_lengths[:, None]] = PAD
    return scores, history, pad_lengths


def per_row(processors: list, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``processors(prompt_ignore_length)`` applied row by row (transformers < 5.23 takes one int)."""
    return torch.cat([LogitsProcessorList(processors(i))(history[i:i + 1], scores[i:i + 1].clone())
                      for i in range(scores.shape[0])])


def test_repetition_penalty_matches_transformers() -> None:
    """Expected: RepetitionPenaltyLogitsProcessor(prompt_ignore_length=padding), i.e. padding not penalised."""
    scores, history, pad_lengths = random_scores_and_history()
    valid = torch.arange(12)[None, :] >= pad_lengths[:, None]
    for penalty in (1.3, 0.7):
        ref = per_row(lambda i: [RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=int(pad_lengths[i]))],
                      history, scores)
        ours = apply_repetition_penalty(scores, history, valid, penalty)
        assert torch.equal(ours, ref)
        assert not torch.equal(ours, scores)


@pytest.mark.parametrize("top_p", [0.0, 0.3, 0.9, 0.999])
def test_top_p_matches_transformers(top_p: float) -> None:
    scores, history, _ = random_scores_and_history(1)
    assert torch.equal(apply_top_p(scores, top_p), TopPLogitsWarper(top_p)(history, scores.clone()))


@pytest.mark.parametrize("top_k", [1, 5, 200])
def test_top_k_matches_transformers(top_k: int) -> None:
    scores, history, _ = random_scores_and_history(2)
    assert torch.equal(apply_top_k(scores, top_k), TopKLogitsWarper(top_k)(history, scores.clone()))


@pytest.mark.parametrize("do_sample", [True, False])
def test_processor_chain_matches_transformers(do_sample: bool) -> None:
    """Expected: transformers' chain in generate's order (penalty; when sampling temperature, top-k, top-p)."""
    scores, history, pad_lengths = random_scores_and_history(3)
    valid = torch.arange(12)[None, :] >= pad_lengths[:, None]

    def chain(i: int) -> list:
        penalty = [RepetitionPenaltyLogitsProcessor(1.2, prompt_ignore_length=int(pad_lengths[i]))]
        return penalty + ([TemperatureLogitsWarper(0.7), TopKLogitsWarper(30), TopPLogitsWarper(0.8)] if do_sample else [])

    ref = per_row(chain, history, scores)
    ours = process_logits(scores, history, valid, do_sample=do_sample, top_k=30, top_p=0.8, temperature=0.7,
                          repetition_penalty=1.2)
    assert torch.equal(ours, ref)


def test_invalid_settings_are_reported_together() -> None:
    model = mftune_from_hf(hf_model())
    with pytest.raises(ValueError) as err:
        generate(model, [[5, 6]], max_new_tokens=-1, eos_token_id=2, pad_token_id=PAD, top_k=-2, top_p=1.5,
                 temperature=0.0, repetition_penalty=0.0)
    for key in ("max_new_tokens=-1", "top_k=-2", "top_p=1.5", "temperature=0.0", "repetition_penalty=0.0"):
        assert key in str(err.value)
    with pytest.raises(ValueError, match="prompts is invalid"):
        generate(model, [[5], []], max_new_tokens=2, eos_token_id=2, pad_token_id=PAD)


def test_a_missing_prompts_file_is_an_error_not_a_prompt(tmp_path):
    """--predict_data DIR/prompts.txt that does not exist used to be decoded as the prompt text itself."""
    import pytest

    from mftune.trainer.predict import read_prompts
    missing = str(tmp_path / "prompts.txt")
    with pytest.raises(ValueError, match=f"predict_data={missing} looks like a prompts file but does not exist"):
        read_prompts(missing)
    assert read_prompts("What is in data/prompts.txt?") == ["What is in data/prompts.txt?"]  # a prompt with spaces
    assert read_prompts("hello.txt") == ["hello.txt"]  # no folder: could be either; taken as text, as before
