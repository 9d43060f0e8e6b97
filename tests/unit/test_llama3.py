"""Llama 3 / 3.1 as MindFormers runs them: the tiktoken tokenizer, the conversation formats, LLAMA3 RoPE.

References: tiktoken itself (an Encoding built here from Meta's special-token list, written out),
transformers' PreTrainedTokenizerFast over the same file (its TikTokenConverter: another BPE engine),
transformers' apply_chat_template with Meta's Llama 3 chat template (public; copied below), hand-derived
ids from MindFormers' research/llama3/llama_preprocess.py, transformers' LlamaForCausalLM with
``rope_type: llama3``. MindFormers' own code is the reference in tests/e2e/test_llama3_runs.py.
"""
from __future__ import annotations

import json
import pickle
import unicodedata

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import torch
from tiktoken.load import load_tiktoken_bpe
from tiktoken_files import SAMPLE_TEXTS, write_tiktoken_file
from tiny_hf import hf_model, mftune_from_hf
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from mftune.checkpoint.names import hf_config_to_model_config, model_config_to_hf_config
from mftune.data.conversation import VICUNA_SYSTEM
from mftune.data.labelling import IGNORE_TOKEN_ID
from mftune.data.preprocess import preprocess_qa
from mftune.data.raw import cached_dataset
from mftune.data.sample import train_sample_tokenizer
from mftune.data.templates import TEMPLATES, get_template
from mftune.data.tiktoken_tokenizer import Llama3Tokenizer
from mftune.data.tokenizer import LlamaTokenizer
from mftune.data.tokenizer_kinds import build_tokenizer, detect_type
from mftune.data.wikipedia import align, wikipedia_records
from mftune.errors import DataError
from mftune.generation import GenerationConfig
from mftune.models.config import LlamaConfig, model_config_errors
from mftune.models.llama import LlamaForCausalLM
from mftune.models.rope import inv_freq
from mftune.trainer.predict import encode_prompts, stop_ids

# Meta's Llama 3 special tokens, in id order after the base vocabulary (llama3/tokenizer.py; MindFormers'
# research/llama3/llama3_tokenizer.py has the same list).
META_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"] + \
                [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
META_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CONVERSATIONS = [
    [("human", "Give three tips for staying healthy."), ("gpt", "1. Eat well.\n2. Exercise.\n3. Sleep 8 hours.")],
    [("human", "  人工智能是什么？ "), ("gpt", "计算机科学的一个分支 🎉"), ("human", "def f(x): return x"),
     ("gpt", "It returns x.   ")],
]


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory) -> str:
    return write_tiktoken_file(tmp_path_factory.mktemp("llama3") / "tokenizer.model")


@pytest.fixture(scope="module")
def tok(tok_file) -> Llama3Tokenizer:
    return Llama3Tokenizer(tok_file)


@pytest.fixture(scope="module")
def hf_tok(tok_file) -> PreTrainedTokenizerFast:
    converted = TikTokenConverter(vocab_file=tok_file, extra_special_tokens=META_SPECIALS).converted()
    return PreTrainedTokenizerFast(tokenizer_object=converted, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>")


# ---------------------------------------------------------------------------------------------- tokenizer

def test_ids_equal_tiktoken_and_transformers_on_a_multilingual_sample(tok, tok_file, hf_tok):
    reference = tiktoken.Encoding("ref", pat_str=META_PATTERN, mergeable_ranks=load_tiktoken_bpe(tok_file),
                                  special_tokens={t: tok.num_base_tokens + i for i, t in enumerate(META_SPECIALS)})
    for text in SAMPLE_TEXTS:
        ours = tok.encode(text, add_bos=False)
        assert ours == reference.encode(text, allowed_special="all"), text
        assert ours == hf_tok.encode(text, add_special_tokens=False), text
        assert tok.decode(ours) == text.replace("<|begin_of_text|>", "").replace("<|start_header_id|>", "") \
            .replace("<|end_header_id|>", "").replace("<|eot_id|>", "")  # special tokens decode to nothing


def test_special_ids_and_vocab_size_follow_the_base_vocabulary(tok):
    n = tok.num_base_tokens
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (n, n + 1, n + 2)
    headers = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    assert [tok.token_id(t) for t in headers] == [n + 6, n + 7, n + 9]
    assert tok.token_id("<|reserved_special_token_250|>") == n + 255 and tok.vocab_size == n + 256
    assert tok.encode("x", add_bos=True, add_eos=True)[::len(tok.encode("x", False)) + 1] == [n, n + 1]
    # special tokens in the text are special ids (MindFormers: allowed_special="all")
    assert tok.encode("a<|eot_id|>b", add_bos=False) == tok.encode("a", False) + [n + 9] + tok.encode("b", False)


def test_text_is_nfc_normalised_as_mindformers_does(tok):
    decomposed = unicodedata.normalize("NFD", "café naïve")
    assert decomposed != "café naïve" and tok.encode(decomposed, False) == tok.encode("café naïve", False)


def test_tokenizer_pickles_and_the_factory_recognises_each_kind(tok, tok_file, tmp_path):
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(SAMPLE_TEXTS[2]) == tok.encode(SAMPLE_TEXTS[2]) and again.vocab_file == tok_file
    assert detect_type(tok_file) == "Llama3Tokenizer"
    assert isinstance(build_tokenizer(tok_file), Llama3Tokenizer)
    assert isinstance(build_tokenizer(tok_file, "Llama3Tokenizer"), Llama3Tokenizer)
    with pytest.raises(DataError, match="processor.tokenizer.type='LlamaTokenizer' does not fit .* tiktoken BPE file "
                                        r"\(Llama 3\). Set processor.tokenizer.type: Llama3Tokenizer"):
        build_tokenizer(tok_file, "LlamaTokenizer")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"{\"model\": {}}")
    with pytest.raises(DataError, match="is in no format mftune reads"):
        build_tokenizer(str(garbage))
    broken = tmp_path / "broken.model"
    broken.write_bytes(open(tok_file, "rb").read() + b"!!notbase64 12\n")
    with pytest.raises(DataError, match=r"line \d+ .* is not a tiktoken entry"):
        build_tokenizer(str(broken))


def test_sentencepiece_files_still_build_the_llama2_tokenizer(tmp_path):
    path = train_sample_tokenizer(str(tmp_path / "sp"), 1000)
    assert detect_type(path) == "LlamaTokenizer" and isinstance(build_tokenizer(path), LlamaTokenizer)


# ---------------------------------------------------------------------------------------------- formats

def _records(conversations):
    return [{"conversations": [{"from": f, "value": v} for f, v in conv]} for conv in conversations]


def _preprocess(tmp_path, tok, template, seq_length=160, name="out"):
    src = tmp_path / f"{name}.json"
    src.write_text(json.dumps(_records(CONVERSATIONS)))
    preprocess_qa([str(src)], tok, seq_length, str(tmp_path / name), template=template)
    return datasets.load_from_disk(str(tmp_path / name))


def test_vicuna_with_the_llama3_tokenizer_is_mindformers_llama3_preprocessing(tmp_path, tok):
    """research/llama3/llama_preprocess.py: Vicuna v1.1 text split on "</s>"; each round's ids then the
    tokenizer's eos (<|end_of_text|>); labels drop bos and each round's "... ASSISTANT:" part; pad
    <|reserved_special_token_0|>. Hand-derived below for both conversations."""
    ds = _preprocess(tmp_path, tok, None)
    enc = lambda s: tok.encode(s, add_bos=False)  # noqa: E731
    for row, conv in zip(ds, CONVERSATIONS):
        ids, labels = [tok.bos_token_id], [IGNORE_TOKEN_ID]
        for k in range(0, len(conv), 2):
            user, answer = conv[k][1], conv[k + 1][1]
            head = (VICUNA_SYSTEM + " " if k == 0 else "") + f"USER: {user} ASSISTANT:"
            ids += enc(head) + enc(" " + answer) + [tok.eos_token_id]
            labels += [IGNORE_TOKEN_ID] * len(enc(head)) + enc(" " + answer) + [tok.eos_token_id]
        fill = 161 - len(ids)
        assert row["input_ids"] == ids + [tok.pad_token_id] * fill
        assert row["labels"] == labels + [IGNORE_TOKEN_ID] * fill


def test_llama3_format_equals_apply_chat_template_and_trains_on_answers(tmp_path, tok, hf_tok):
    ds = _preprocess(tmp_path, tok, "llama3")
    roles = {"human": "user", "gpt": "assistant"}
    eot, enc = tok.token_id("<|eot_id|>"), (lambda s: tok.encode(s, add_bos=False))  # noqa: E731
    for row, conv in zip(ds, CONVERSATIONS):
        messages = [{"role": roles[f], "content": v} for f, v in conv]
        expected = hf_tok.apply_chat_template(messages, chat_template=LLAMA3_CHAT_TEMPLATE,
                                              tokenize=True)["input_ids"]
        n = len(expected)
        assert row["input_ids"] == expected + [tok.pad_token_id] * (161 - n)
        trained = [enc(v.strip()) + [eot] for f, v in conv if f == "gpt"]  # hand-derived: answers and their eot
        assert [t for t in row["labels"] if t != IGNORE_TOKEN_ID] == sum(trained, [])
        assert row["labels"][n:] == [IGNORE_TOKEN_ID] * (161 - n)


def test_llama3_format_cuts_long_records_and_needs_the_llama3_tokenizer(tmp_path, tok):
    ds = _preprocess(tmp_path, tok, "llama3", seq_length=40, name="short")
    assert all(len(r["input_ids"]) == 41 and len(r["labels"]) == 41 for r in ds)
    assert any(r["input_ids"][-1] != tok.pad_token_id for r in ds)  # a record was cut
    with pytest.raises(DataError, match="template='chatml' is invalid"):
        get_template("chatml", tok)
    sp = type("SP", (), {"type_name": "LlamaTokenizer", "vocab_file": "sp.model"})()
    with pytest.raises(DataError, match="needs Llama3Tokenizer"):
        get_template("llama3", sp)


def test_raw_files_take_the_tokenizer_type_and_template_from_the_config(tmp_path, tok_file):
    """A raw data file as dataset_dir: processor.tokenizer.type must fit the file, chat_template picks the
    format, and each template has its own cache (the Vicuna key is the one earlier versions wrote)."""
    src = tmp_path / "conv.json"
    src.write_text(json.dumps(_records(CONVERSATIONS)))
    vicuna = cached_dataset(str(src), tok_file, 160, str(tmp_path / "cache"), tokenizer_type="Llama3Tokenizer")
    llama3 = cached_dataset(str(src), tok_file, 160, str(tmp_path / "cache"), tokenizer_type="Llama3Tokenizer",
                            template="llama3")
    assert vicuna != llama3
    assert cached_dataset(str(src), tok_file, 160, str(tmp_path / "cache"), template="vicuna") == vicuna
    assert datasets.load_from_disk(llama3)["input_ids"] == _preprocess(tmp_path, Llama3Tokenizer(tok_file),
                                                                       "llama3")["input_ids"]
    with pytest.raises(DataError, match="Set processor.tokenizer.type: Llama3Tokenizer"):
        cached_dataset(str(src), tok_file, 96, str(tmp_path / "cache"), tokenizer_type="LlamaTokenizer")


def test_predict_prompts_follow_mindformers_unless_a_template_is_set(tok, hf_tok):
    gen = GenerationConfig.from_model_config(LlamaConfig(max_decode_length=200))
    (plain,), _ = encode_prompts(tok, ["Hi there"], gen)  # MindFormers' Llama 3 predict: no bos
    assert plain == tok.encode("Hi there", add_bos=False)
    (with_bos,), _ = encode_prompts(tok, ["Hi there"], gen, add_bos=True)
    assert with_bos == [tok.bos_token_id] + plain
    (chat,), _ = encode_prompts(tok, ["Hi there"], gen, TEMPLATES["llama3"])
    expected = hf_tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=True,
                                          chat_template=LLAMA3_CHAT_TEMPLATE, add_generation_prompt=True)
    assert chat == expected["input_ids"]
    assert stop_ids(tok, TEMPLATES["llama3"]) == [tok.token_id("<|eot_id|>")] and stop_ids(tok, None) == []


# ---------------------------------------------------------------------------------------------- wikipedia

def test_wikipedia_chunks_keep_mindformers_quirks():
    """pad_func by hand: 5 ids pending with n=3 -> chunk [0:3] (leaves 2); exactly n pending -> dropped."""
    assert align([[1, 2], [3, 4, 5]], 3) == [[1, 2, 3]]
    assert align([[1, 2, 3]], 3) == []  # exactly n ids pending: MindFormers drops them
    assert align([[1, 2, 3, 4, 5, 6, 7]], 3) == [[1, 2, 3], [4, 5, 6]]


def test_wikipedia_writes_exactly_samples_num_records_reading_the_files_again(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["one two three four five six seven"]}), path)
    words = "one two three four five six seven".split()
    fake = type("T", (), {"bos_token_id": 100, "eos_token_id": 101,
                          "encode_batch": lambda self, texts: [[words.index(w) for w in t.split()] for t in texts]})()
    records = wikipedia_records([str(path)], fake, 3, 5)  # chunks [0,1,2], [3,4,5] per pass
    assert records.tolist() == [[100, 0, 101], [100, 3, 101]] * 2 + [[100, 0, 101]]


# ---------------------------------------------------------------------------------------------- RoPE

LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32}


def test_llama3_rope_model_matches_transformers_beyond_original_positions():
    """A Llama 3.1-shaped model: GQA, theta 500000, untied, rope_type llama3 with original context 32
    (head_dim 16: wavelengths fall in all three bands), 60 positions."""
    hf = hf_model(2, rope_theta=500000.0, rope_scaling=dict(LLAMA31_SCALING), max_position_embeddings=64)
    ours = mftune_from_hf(hf)
    assert ours.config.extend_method == "LLAMA3" and ours.config.scaling_factor["factor"] == 8.0
    assert torch.equal(inv_freq(ours.args, torch.device("cpu")), hf.model.rotary_emb.inv_freq)  # bit for bit
    x = torch.randint(0, 128, (2, 60), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=1e-5)
        plain = mftune_from_hf(hf_model(2, rope_theta=500000.0, max_position_embeddings=64))(x)
    assert not torch.allclose(ours(x)[:, 40:], plain[:, 40:], atol=1e-3)  # the scaling changes something


def test_llama3_scaling_factor_is_checked_and_converts_both_ways():
    base = dict(hidden_size=64, num_heads=4, num_layers=1, vocab_size=32)
    mapping = {k: v for k, v in LLAMA31_SCALING.items() if k != "rope_type"}
    assert model_config_errors(LlamaConfig(**base, extend_method="LLAMA3", scaling_factor=mapping)) == []
    for scaling, why in ((2.0, "exactly factor"), ({**mapping, "factor": 0.5}, "factor >= 1"),
                         ({k: v for k, v in mapping.items() if k != "factor"}, "exactly factor"),
                         ({**mapping, "high_freq_factor": 1.0}, "low_freq_factor < high_freq_factor")):
        (err,) = model_config_errors(LlamaConfig(**base, extend_method="LLAMA3", scaling_factor=scaling))
        assert err.startswith("scaling_factor=") and why in err
    (err,) = model_config_errors(LlamaConfig(**base, extend_method="PI", scaling_factor=mapping))
    assert "a mapping is for extend_method LLAMA3" in err
    mc = hf_config_to_model_config({"hidden_size": 64, "num_attention_heads": 4, "rope_scaling": LLAMA31_SCALING})
    assert (mc["extend_method"], mc["scaling_factor"]) == ("LLAMA3", mapping)
    hf = model_config_to_hf_config({**base, "extend_method": "LLAMA3", "scaling_factor": mapping})
    assert hf["rope_scaling"] == LLAMA31_SCALING
    LlamaForCausalLM({**base, "extend_method": "llama3", "scaling_factor": mapping})  # builds
