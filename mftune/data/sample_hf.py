"""A Llama 3-style Hugging Face tokenizer for the bundled sample: the tokenizer half of the directory that
``scripts/demo_hf.py`` builds (``mftune.checkpoint.sample_hf`` adds config.json and random weights).

No hub is reachable, so the demo makes what a Llama 3 Instruct download holds, in small:

- ``tokenizer.json``: a byte-level BPE trained by the ``tokenizers`` library on the sample's text, laid
  out as Meta's: Llama 3's split regex then byte-level (``PAT_STR``), ``ignore_merges``, no normaliser,
  a post-processor that puts ``<|begin_of_text|>`` first, and Llama 3's special tokens after the BPE
  tokens in Meta's order (``<|begin_of_text|>``, ``<|end_of_text|>``, reserved 0-3,
  ``<|start_header_id|>``, ``<|end_header_id|>``, reserved 4, ``<|eot_id|>``: ids n..n+9 as 128000..128009).
- ``tokenizer_config.json`` and ``special_tokens_map.json`` as transformers 4 writes them for Llama 3.x
  Instruct: bos ``<|begin_of_text|>``, eos ``<|eot_id|>``, Meta's Instruct chat template,
  ``tokenizer_class: PreTrainedTokenizerFast``. ``clean_up_tokenization_spaces`` is False (Meta's files say True,
  which transformers 4 applies to decoded text, " ." -> ".", and transformers 5 ignores for BPE with a warning).

The training text is what the chat template renders from each record between the special tokens (the
user turn ``plain_prompt(instruction, input)``, the answer, the role names, the blank line after a
header), so every record is 19-26 tokens (mean ~22.5): seq_length 32 holds each one whole.
Deterministic: the same records give the same file, byte for byte.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mftune.data.records import plain_prompt
from mftune.data.sample import load_sample_records
from mftune.data.tiktoken_tokenizer import BOS_TOKEN, EOS_TOKEN, EOT, PAT_STR, SPECIAL_TOKENS
from mftune.fileio import atomic_open, atomic_path

# Llama 3's first ten special tokens, in Meta's order (bos ... <|eot_id|>)
SAMPLE_SPECIAL_TOKENS: tuple[str, ...] = SPECIAL_TOKENS[:SPECIAL_TOKENS.index(EOT) + 1]
SAMPLE_BPE_VOCAB_SIZE = 1014  # BPE tokens asked for; + 10 special tokens = 1024 ids
SAMPLE_MAX_LENGTH = 1024  # model_max_length (Llama 3.2: 131072, its max_position_embeddings)

# meta-llama/Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template, verbatim
LLAMA3_INSTRUCT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@dataclass(frozen=True)
class SampleTokenizer:
    """What config.json needs from the tokenizer written: its size and the ids of its special tokens."""
    vocab_size: int
    bos_token_id: int
    eos_token_ids: list[int]  # <|end_of_text|>, <|eot_id|>: what generation stops at (config.json's list)


def training_texts(records: list[dict]) -> list[str]:
    """The texts between special tokens that the chat template renders from ``records``, as often as it
    renders them (the role names and the blank line after a header once per turn)."""
    return [text for r in records for text in
            ("user", "\n\n", plain_prompt(r["instruction"], r.get("input") or ""), "assistant", "\n\n", r["output"])]


def train_sample_bpe(records: list[dict] | None = None, vocab_size: int = SAMPLE_BPE_VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` with Llama 3's pipeline, trained on ``records`` (default: the
    bundled sample); the special tokens follow the BPE tokens (fewer than ``vocab_size`` when the text runs out
    of pairs to merge)."""
    records = load_sample_records() if records is None else records
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_texts(records), trainer=trainer)
    tok.add_special_tokens(list(SAMPLE_SPECIAL_TOKENS))
    bos = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
                                      special_tokens=[(BOS_TOKEN, bos)])])
    return tok


def tokenizer_config(tok: Tokenizer) -> dict:
    """tokenizer_config.json as transformers 4 writes it for Llama 3.x Instruct (keys sorted)."""
    decoder = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                         "single_word": False, "special": True} for t in SAMPLE_SPECIAL_TOKENS}
    return {"added_tokens_decoder": decoder, "bos_token": BOS_TOKEN, "chat_template": LLAMA3_INSTRUCT_TEMPLATE,
            "clean_up_tokenization_spaces": False, "eos_token": EOT,
            "model_input_names": ["input_ids", "attention_mask"], "model_max_length": SAMPLE_MAX_LENGTH,
            "tokenizer_class": "PreTrainedTokenizerFast"}


def write_sample_hf_tokenizer(directory: str, records: list[dict] | None = None) -> SampleTokenizer:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json (module docstring) in ``directory``,
    each written atomically; returns the vocabulary size and special ids config.json needs."""
    tok = train_sample_bpe(records)
    with atomic_path(os.path.join(directory, "tokenizer.json")) as tmp:
        tok.save(tmp)
    _write_json(os.path.join(directory, "tokenizer_config.json"), tokenizer_config(tok))
    _write_json(os.path.join(directory, "special_tokens_map.json"), {"bos_token": BOS_TOKEN, "eos_token": EOT})
    return SampleTokenizer(tok.get_vocab_size(), tok.token_to_id(BOS_TOKEN),
                           [tok.token_to_id(EOS_TOKEN), tok.token_to_id(EOT)])


def _write_json(path: str, obj: dict) -> None:
    with atomic_open(path, encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
