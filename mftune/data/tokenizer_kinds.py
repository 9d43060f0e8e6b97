"""Which tokenizer a file needs, and building it: the one place tokenizer kinds are recognised.

Kinds, by ``processor.tokenizer.type`` (MindFormers' names), each one module with a class and a
``matches(head)`` test on the file's first bytes:

- ``LlamaTokenizer`` (``mftune.data.tokenizer``): a SentencePiece ``tokenizer.model`` (protobuf),
  Llama 1/2.
- ``Llama3Tokenizer`` (``mftune.data.tiktoken_tokenizer``): a tiktoken ``tokenizer.model`` (text
  lines ``<base64 token> <rank>``), Llama 3 / 3.1.
- ``LlamaTokenizerFast`` (``mftune.data.hf_tokenizer``): a Hugging Face ``tokenizer.json`` (the
  ``tokenizers`` library: Llama 3, SmolLM, Qwen-style byte-level BPE, fast Llama 2).

``vocab_file`` may also be a Hugging Face model directory: ``resolve_vocab_file`` takes its
``tokenizer.json``, else its ``tokenizer.model`` (SentencePiece or tiktoken by content); a given
``type`` picks the file of its kind. Whatever the kind, the tokenizer carries what its directory says
(``hf_tokenizer.read_directory_meta``): ``chat_template``, ``special_tokens_map`` (the texts of
bos/eos/unk/pad, which Jinja chat templates use) and ``stop_token_ids`` (eos plus the model's eos ids).

A new kind is one module plus one line in ``TOKENIZER_TYPES``. Every tokenizer offers what
preprocessing, raw datasets and predict use (``Tokenizer``).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

from mftune.data import hf_tokenizer, tiktoken_tokenizer, tokenizer
from mftune.errors import DataError

# type name -> module with `matches(head: bytes) -> bool`; its class is TOKENIZER_CLASSES[name]. The first
# that matches wins: the strictest test first (a tiktoken file may start with a newline, SentencePiece's 0x0A).
TOKENIZER_TYPES = {
    "Llama3Tokenizer": tiktoken_tokenizer,
    "LlamaTokenizer": tokenizer,
    "LlamaTokenizerFast": hf_tokenizer,
}
TOKENIZER_CLASSES = {
    "LlamaTokenizer": tokenizer.LlamaTokenizer,
    "Llama3Tokenizer": tiktoken_tokenizer.Llama3Tokenizer,
    "LlamaTokenizerFast": hf_tokenizer.HFTokenizer,
}
_DESCRIPTIONS = {
    "LlamaTokenizer": "a SentencePiece model (Llama 1/2)",
    "Llama3Tokenizer": "a tiktoken BPE file (Llama 3)",
    "LlamaTokenizerFast": "a Hugging Face tokenizer.json",
}
# the file a Hugging Face directory holds for each kind, in the order a directory is searched
_DIRECTORY_FILES = {"LlamaTokenizerFast": hf_tokenizer.TOKENIZER_JSON, "LlamaTokenizer": "tokenizer.model",
                    "Llama3Tokenizer": "tokenizer.model"}
_HEAD_BYTES = 4096


class Tokenizer(Protocol):
    """What mftune asks of a tokenizer (every kind is picklable, for ``datasets.map(num_proc=...)``)."""

    type_name: str         # its processor.tokenizer.type
    vocab_file: str
    add_bos_token: bool    # MindFormers' default for prompts (predict)
    bos_token_id: int | None  # None: a tokenizer.json without bos (Qwen-style)
    eos_token_id: int
    pad_token_id: int
    # set from the tokenizer's directory by build_tokenizer (chat_template_of, stop_ids_of read them)
    special_tokens_map: dict[str, str]

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def resolve_vocab_file(path: str, type_name: str | None = None) -> str:
    """The tokenizer file ``path`` means: itself, or in a Hugging Face directory the file of ``type_name``'s
    kind (None: tokenizer.json, else tokenizer.model). DataError names what is missing and the fix."""
    if not os.path.isdir(path):
        return path
    names = [n for n in dict.fromkeys([_DIRECTORY_FILES.get(type_name), *_DIRECTORY_FILES.values()]) if n]
    for name in names:  # the type's own file first; another kind's file then fails build_tokenizer's type check
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise DataError(f"tokenizer directory {path!r} holds no {' or '.join(names)}. Pass a Hugging Face model "
                    "directory with its tokenizer files, or the tokenizer file itself.")


def detect_type(vocab_file: str) -> str | None:
    """The tokenizer type whose file format ``vocab_file`` has, or None (DataError if it cannot be read)."""
    if not os.path.isfile(vocab_file):
        raise DataError(f"tokenizer file {vocab_file!r} does not exist. Pass the tokenizer.model or tokenizer.json "
                        "of the checkpoint, or its Hugging Face directory (processor.tokenizer.vocab_file, or "
                        "--model_file for the data tools).")
    with open(vocab_file, "rb") as f:
        head = f.read(_HEAD_BYTES)
    found = [name for name, module in TOKENIZER_TYPES.items() if module.matches(head)]
    return found[0] if found else None


def build_tokenizer(vocab_file: str, type_name: str | None = None) -> Tokenizer:
    """The tokenizer for ``vocab_file`` (a file, or a Hugging Face directory: ``resolve_vocab_file``).
    ``type_name`` (``processor.tokenizer.type``) must agree with the file's format when given; None takes
    the format's type. DataError names the file, the type and the fix."""
    if type_name is not None and type_name not in TOKENIZER_TYPES:
        raise DataError(f"processor.tokenizer.type={type_name!r} is invalid: mftune has "
                        f"{', '.join(TOKENIZER_TYPES)}. Use one of them.")
    vocab_file = resolve_vocab_file(vocab_file, type_name)
    found = detect_type(vocab_file)
    if found is None:
        kinds = "; ".join(f"{n}: {d}" for n, d in _DESCRIPTIONS.items())
        raise DataError(f"tokenizer file {vocab_file!r} is in no format mftune reads ({kinds}). "
                        "Pass the tokenizer.model that belongs to the checkpoint.")
    if type_name is not None and type_name != found:
        raise DataError(f"processor.tokenizer.type={type_name!r} does not fit {vocab_file!r}, which is "
                        f"{_DESCRIPTIONS[found]}. Set processor.tokenizer.type: {found} (or --tokenizer "
                        f"{TOOL_NAMES_BY_TYPE[found]} for the data tools), or pass the other file.")
    return _with_directory_meta(TOKENIZER_CLASSES[found](vocab_file))


def _with_directory_meta(tok: Tokenizer) -> Tokenizer:
    """A SentencePiece or tiktoken tokenizer gets what its directory says (chat template, special tokens'
    texts, the model's eos ids); a tokenizer.json tokenizer reads them itself. Ids are never changed."""
    if isinstance(tok, hf_tokenizer.HFTokenizer):
        return tok
    meta = hf_tokenizer.read_directory_meta(os.path.dirname(os.path.abspath(tok.vocab_file)))
    if isinstance(tok, tokenizer.LlamaTokenizer):
        own = {"bos_token": tok.id_to_piece(tok.bos_token_id), "eos_token": tok.id_to_piece(tok.eos_token_id),
               "unk_token": tok.id_to_piece(tok.unk_token_id)}
    else:
        own = {"bos_token": tiktoken_tokenizer.BOS_TOKEN, "eos_token": tiktoken_tokenizer.EOS_TOKEN,
               "pad_token": tiktoken_tokenizer.PAD_TOKEN}
    tok.special_tokens_map = {**own, **meta["special_tokens"]}
    tok.chat_template = meta["chat_template"]
    tok.stop_token_ids = list(dict.fromkeys([tok.eos_token_id, *meta["model_eos_ids"]]))
    return tok


def chat_template_of(tok: Tokenizer) -> str | None:
    """The tokenizer's own Jinja chat template (from its directory), or None."""
    return getattr(tok, "chat_template", None)


def stop_ids_of(tok: Tokenizer) -> list[int]:
    """Every id that ends generation: the tokenizer's eos and the model's eos ids of its directory."""
    return list(getattr(tok, "stop_token_ids", None) or [tok.eos_token_id])


# scripts/llama_preprocess.py --tokenizer values (MindFormers: "llama" in its Llama 2 tool, "llama3" in Llama 3's)
TOOL_NAMES = {"llama": "LlamaTokenizer", "llama3": "Llama3Tokenizer", "hf": "LlamaTokenizerFast"}
TOOL_NAMES_BY_TYPE = {v: k for k, v in TOOL_NAMES.items()}
