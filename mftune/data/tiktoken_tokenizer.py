"""Llama 3's tokenizer: a tiktoken BPE file plus 256 special tokens, as MindFormers' ``Llama3Tokenizer``.

MindFormers (``research/llama3/llama3_tokenizer.py``, the same in ``research/llama3_1/`` and up to
v1.5.0) reads Meta's ``tokenizer.model``: one line per token, ``<base64 bytes> <rank>``. The ranks
are the ids of the 128,000 byte-level BPE tokens; the special tokens follow them, in Meta's Llama 3
order (``SPECIAL_TOKENS``), so ``<|begin_of_text|>`` is 128000, ``<|end_of_text|>`` 128001,
``<|reserved_special_token_0|>`` (MindFormers' pad) 128002, ``<|start_header_id|>`` 128006,
``<|end_header_id|>`` 128007, ``<|eot_id|>`` 128009, 128256 ids in all.

Encoding is MindFormers': the text is NFC-normalised, split by Llama 3's regex (``PAT_STR``) and
BPE-merged by tiktoken; a special token's text anywhere in the input becomes that special id
(``allowed_special="all"``). Hugging Face's Llama 3 ``tokenizer.json`` does not normalise, so the
two differ only on text that is not in NFC (decomposed accents).
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import unicodedata
from collections.abc import Sequence

import tiktoken

from mftune.errors import DataError

# MindFormers' PAT_STR (Meta's Llama 3 pattern).
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_RESERVED_SPECIAL_TOKENS = 256
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN, EOS_TOKEN, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", START_HEADER, END_HEADER,
    "<|reserved_special_token_4|>", EOT,
    *(f"<|reserved_special_token_{i}|>" for i in range(5, NUM_RESERVED_SPECIAL_TOKENS - 5)),
)  # 256 tokens, ids num_base_tokens + index
_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+")


def matches(head: bytes) -> bool:
    """True when ``head`` (the first bytes of a file) starts like a tiktoken BPE file: ``base64 rank`` lines."""
    first = head.lstrip(b"\r\n").split(b"\n", 1)[0].rstrip(b"\r")
    return bool(_LINE.fullmatch(first))


def parse_ranks(contents: bytes, path: str) -> dict[bytes, int]:
    """``{token bytes: rank}`` of a tiktoken file's contents; DataError names the first bad line."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(contents.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected '<base64 token> <rank>'")
            ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise DataError(f"tokenizer file {path!r}: line {n} ({line[:60]!r}) is not a tiktoken entry ({e}). "
                            "Pass Llama 3's tokenizer.model (lines of '<base64 token> <rank>').") from None
    if not ranks:
        raise DataError(f"tokenizer file {path!r} holds no tokens. Pass Llama 3's tokenizer.model.")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError(f"tokenizer file {path!r}: the ranks of its {len(ranks)} tokens are not 0..{len(ranks) - 1} "
                        "without gaps or repeats. Pass an unmodified tiktoken tokenizer.model.")
    return ranks


class Llama3Tokenizer:
    """Llama 3's tiktoken tokenizer with MindFormers' special ids; pad = ``<|reserved_special_token_0|>``.

    ``add_bos_token`` is MindFormers' default for prompts (False: its Llama 3 predict feeds prompts
    without ``<|begin_of_text|>``); data preprocessing asks for bos and eos explicitly, as MindFormers'
    ``llama_preprocess.py`` does. Picklable (the file's bytes travel) for ``datasets.map(num_proc=...)``.
    """

    type_name = "Llama3Tokenizer"
    add_bos_token = False

    def __init__(self, vocab_file: str):
        self.vocab_file = str(vocab_file)
        if not os.path.isfile(self.vocab_file):
            raise DataError(f"tokenizer file {self.vocab_file!r} does not exist. Pass Llama 3's tokenizer.model.")
        with open(self.vocab_file, "rb") as f:
            self._load(f.read())

    def _load(self, contents: bytes) -> None:
        ranks = parse_ranks(contents, self.vocab_file)
        self._contents = contents
        self.num_base_tokens = len(ranks)
        self.special_tokens = {tok: self.num_base_tokens + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding("Llama3", pat_str=PAT_STR, mergeable_ranks=ranks,
                                     special_tokens=self.special_tokens)
        self.bos_token_id = self.special_tokens[BOS_TOKEN]
        self.eos_token_id = self.special_tokens[EOS_TOKEN]
        self.pad_token_id = self.special_tokens[PAD_TOKEN]

    def __getstate__(self) -> dict:
        return {"vocab_file": self.vocab_file, "contents": self._contents}

    def __setstate__(self, state: dict) -> None:
        self.vocab_file = state["vocab_file"]
        self._load(state["contents"])

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, no bos/eos: NFC, then tiktoken with every special token's text allowed."""
        return [self.enc.encode(unicodedata.normalize("NFC", t), allowed_special="all") for t in texts]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``, with ``<|begin_of_text|>`` first / ``<|end_of_text|>`` last when asked."""
        ids = self.encode_batch([text])[0]
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def token_id(self, token: str) -> int:
        """The id of a special token's text (``"<|eot_id|>"`` -> 128009 in Llama 3)."""
        return self.special_tokens[token]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens decode to nothing (as SentencePiece's control pieces do)."""
        return self.enc.decode([int(i) for i in ids if int(i) < self.num_base_tokens], errors="replace")
