"""The tokenizer.json kind (LlamaTokenizerFast) and Hugging Face directories as vocab_file: the ids equal
transformers' AutoTokenizer.from_pretrained(dir) on a multilingual sample (the reference), special tokens
and eos lists come from the directory's files."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest

from hf_tokenizer_files import CORPUS, SAMPLE, bpe_directory
from mftune.data.hf_tokenizer import HFTokenizer, read_directory_meta
from mftune.data.tokenizer import LlamaTokenizer, train_sentencepiece
from mftune.data.tokenizer_kinds import build_tokenizer, chat_template_of, detect_type, stop_ids_of
from mftune.errors import DataError

transformers = pytest.importorskip("transformers")
TEXTS = [SAMPLE, "Hello world", "  two leading spaces", "中文😀", "a\n\n\tb", "<|eot_id|><|eot_id|>", ""]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return bpe_directory(str(tmp_path_factory.mktemp("bpe")))


def test_tokenizer_json_ids_equal_autotokenizer(bpe_dir):
    ref = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    tok = build_tokenizer(bpe_dir)
    assert isinstance(tok, HFTokenizer) and tok.type_name == "LlamaTokenizerFast"
    assert tok.add_bos_token is True  # the post-processor puts <|begin_of_text|> first, as in Llama 3
    for text in TEXTS:
        assert tok.encode(text, add_bos=tok.add_bos_token) == ref(text).input_ids, text
        assert tok.encode(text, add_bos=False) == ref(text, add_special_tokens=False).input_ids, text
        assert tok.decode(tok.encode(text)) == ref.decode(ref(text).input_ids, skip_special_tokens=True)
    assert tok.encode_batch(TEXTS) == [ref(t, add_special_tokens=False).input_ids for t in TEXTS]
    assert (tok.bos_token_id, tok.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
    assert tok.encode("x", add_bos=False, add_eos=True)[-1] == ref.eos_token_id
    assert tok.vocab_size == len(ref)


def test_special_tokens_eos_list_pad_and_template_from_the_directory(bpe_dir, tmp_path):
    tok = build_tokenizer(os.path.join(bpe_dir, "tokenizer.json"))
    eot = tok.token_id("<|eot_id|>")
    assert stop_ids_of(tok) == [tok.eos_token_id, eot]  # generation_config.json's list
    assert tok.pad_token_id == tok.eos_token_id  # no pad, no unk: eos pads (labels mask padding anyway)
    assert "<|start_header_id|>" in chat_template_of(tok)
    assert tok.special_tokens_map == {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(SAMPLE) == tok.encode(SAMPLE) and clone.stop_token_ids == tok.stop_token_ids
    # tokenizer_config.json wins over special_tokens_map.json; add_bos_token there overrides the post-processor
    d = shutil.copytree(bpe_dir, tmp_path / "d")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(pad_token={"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False,
                          "rstrip": False, "single_word": False, "special": True}, add_bos_token=False)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok2 = build_tokenizer(str(d))
    assert tok2.pad_token_id == tok.token_id("<|im_end|>") and tok2.add_bos_token is False
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    assert ref.pad_token_id == tok2.pad_token_id


def test_chat_template_files_are_read_as_transformers_reads_them(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert read_directory_meta(str(tmp_path))["chat_template"] == "D"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert read_directory_meta(str(tmp_path))["chat_template"] == "J"
    (tmp_path / "chat_template.jinja").write_text("JJ")
    assert read_directory_meta(str(tmp_path))["chat_template"] == "JJ"


def test_a_directory_picks_tokenizer_json_else_tokenizer_model(tmp_path, bpe_dir):
    model = train_sentencepiece(CORPUS * 3, str(tmp_path / "sp" / "sp"), 400)
    both = shutil.copytree(bpe_dir, tmp_path / "both")
    shutil.copy(model, both / "tokenizer.model")
    assert isinstance(build_tokenizer(str(both)), HFTokenizer)
    sp = build_tokenizer(str(both), "LlamaTokenizer")  # the type picks its own file
    assert isinstance(sp, LlamaTokenizer) and "<|start_header_id|>" in chat_template_of(sp)
    only_sp = tmp_path / "only_sp"
    only_sp.mkdir()
    shutil.copy(model, only_sp / "tokenizer.model")
    assert isinstance(build_tokenizer(str(only_sp)), LlamaTokenizer)
    with pytest.raises(DataError, match="does not fit .*tokenizer.json.*Set processor.tokenizer.type: LlamaTokenizerFast"):
        build_tokenizer(bpe_dir, "LlamaTokenizer")
    with pytest.raises(DataError, match="holds no tokenizer.json or tokenizer.model"):
        build_tokenizer(str(tmp_path / "sp"))
    with pytest.raises(DataError, match="does not exist"):
        build_tokenizer(str(tmp_path / "missing"))
    assert detect_type(os.path.join(bpe_dir, "tokenizer.json")) == "LlamaTokenizerFast"


def test_broken_tokenizer_json_is_a_data_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(DataError, match="not a tokenizers-library tokenizer.json"):
        build_tokenizer(str(tmp_path))


def test_sentencepiece_directory_ids_equal_autotokenizer(tmp_path):
    """transformers 5 converts a SentencePiece model only with protobuf installed."""
    pytest.importorskip("google.protobuf")
    model = train_sentencepiece(CORPUS * 3, str(tmp_path / "sp" / "sp"), 400)
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(model, d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                         "eos_token": "</s>", "unk_token": "<unk>"}))
    ref, tok = transformers.AutoTokenizer.from_pretrained(str(d)), build_tokenizer(str(d))
    assert isinstance(tok, LlamaTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
    # transformers 5 adds no bos to a converted model without add_bos_token: ids only. Its converted fast
    # tokenizer (non-legacy) also splits a leading run of spaces differently from SentencePiece itself, which
    # mftune follows as MindFormers' LlamaTokenizer does (docs/data.md); real Hugging Face Llama directories ship
    # a tokenizer.json, which mftune reads first.
    for text in [t for t in TEXTS[:5] if not t.startswith("  ")]:
        assert tok.encode(text, add_bos=False) == ref(text, add_special_tokens=False).input_ids, text
    assert tok.encode("  two", add_bos=False) == tok.sp.encode("  two")
