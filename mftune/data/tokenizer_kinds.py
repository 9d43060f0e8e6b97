"""Which tokenizer a file needs, and building it: the one place tokenizer kinds are recognised.

Kinds, by ``processor.tokenizer.type`` (MindFormers' names), each one module with a class and a
``matches(head)`` test on the file's first bytes:

- ``LlamaTokenizer`` (``mftune.data.tokenizer``): a SentencePiece ``tokenizer.model`` (protobuf),
  Llama 1/2.
- ``Llama3Tokenizer`` (``mftune.data.tiktoken_tokenizer``): a tiktoken ``tokenizer.model`` (text
  lines ``<base64 token> <rank>``), Llama 3 / 3.1.

A new kind (a ``tokenizer.json`` of the tokenizers library, say) is one module plus one line in
``TOKENIZER_TYPES``. Every tokenizer offers what preprocessing, raw datasets and predict use
(``Tokenizer``).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

from mftune.data import tiktoken_tokenizer, tokenizer
from mftune.errors import DataError

# type name -> module with `matches(head: bytes) -> bool`; its class is TOKENIZER_CLASSES[name]. The first
# that matches wins: the strictest test first (a tiktoken file may start with a newline, SentencePiece's 0x0A).
TOKENIZER_TYPES = {
    "Llama3Tokenizer": tiktoken_tokenizer,
    "LlamaTokenizer": tokenizer,
}
TOKENIZER_CLASSES = {
    "LlamaTokenizer": tokenizer.LlamaTokenizer,
    "Llama3Tokenizer": tiktoken_tokenizer.Llama3Tokenizer,
}
_DESCRIPTIONS = {
    "LlamaTokenizer": "a SentencePiece model (Llama 1/2)",
    "Llama3Tokenizer": "a tiktoken BPE file (Llama 3)",
}
_HEAD_BYTES = 4096


class Tokenizer(Protocol):
    """What mftune asks of a tokenizer (both kinds are picklable, for ``datasets.map(num_proc=...)``)."""

    type_name: str         # its processor.tokenizer.type
    vocab_file: str
    add_bos_token: bool    # MindFormers' default for prompts (predict)
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def detect_type(vocab_file: str) -> str | None:
    """The tokenizer type whose file format ``vocab_file`` has, or None (DataError if it cannot be read)."""
    if not os.path.isfile(vocab_file):
        raise DataError(f"tokenizer file {vocab_file!r} does not exist. Pass the tokenizer.model of the checkpoint "
                        "(processor.tokenizer.vocab_file, or --model_file for the data tools).")
    with open(vocab_file, "rb") as f:
        head = f.read(_HEAD_BYTES)
    found = [name for name, module in TOKENIZER_TYPES.items() if module.matches(head)]
    return found[0] if found else None


def build_tokenizer(vocab_file: str, type_name: str | None = None) -> Tokenizer:
    """The tokenizer for ``vocab_file``. ``type_name`` (``processor.tokenizer.type``) must agree with the
    file's format when given; None takes the format's type. DataError names the file, the type and the fix."""
    if type_name is not None and type_name not in TOKENIZER_TYPES:
        raise DataError(f"processor.tokenizer.type={type_name!r} is invalid: mftune has "
                        f"{', '.join(TOKENIZER_TYPES)}. Use one of them.")
    found = detect_type(vocab_file)
    if found is None:
        kinds = "; ".join(f"{n}: {d}" for n, d in _DESCRIPTIONS.items())
        raise DataError(f"tokenizer file {vocab_file!r} is in no format mftune reads ({kinds}). "
                        "Pass the tokenizer.model that belongs to the checkpoint.")
    if type_name is not None and type_name != found:
        raise DataError(f"processor.tokenizer.type={type_name!r} does not fit {vocab_file!r}, which is "
                        f"{_DESCRIPTIONS[found]}. Set processor.tokenizer.type: {found} (or --tokenizer "
                        f"{TOOL_NAMES_BY_TYPE[found]} for the data tools), or pass the other file.")
    return TOKENIZER_CLASSES[found](vocab_file)


# scripts/llama_preprocess.py --tokenizer values (MindFormers: "llama" in its Llama 2 tool, "llama3" in Llama 3's)
TOOL_NAMES = {"llama": "LlamaTokenizer", "llama3": "Llama3Tokenizer"}
TOOL_NAMES_BY_TYPE = {v: k for k, v in TOOL_NAMES.items()}
