"""Llama's SentencePiece tokenizer, and a trainer for small Llama-like ones.

`LlamaTokenizer` mirrors the parts of MindFormers' `LlamaTokenizer` that data preparation
uses: ids of `<unk>`/`<s>`/`</s>` (0/1/2), pad = unk = 0 (Llama has no pad piece), and
`encode(text, add_bos, add_eos)`. It reads the same `tokenizer.model` file as MindFormers
and Hugging Face.

`train_sentencepiece` writes a BPE model with Llama's trainer settings (identity
normalisation, whitespace kept as-is, digits split, byte fallback), so that a tiny model
trained on bundled data tokenises the way a real Llama tokenizer does: "\\n" becomes the
byte piece <0x0A>, a trailing space survives as "▁", and no text maps to <unk>.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from mftune.errors import DataError

# Llama-2's special ids (its tokenizer.model); train_sentencepiece writes the same.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# Byte fallback needs 256 byte pieces + 3 specials; below this many pieces in total we
# train without it (a tiny corpus cannot fill the rest of the vocabulary otherwise).
_MIN_VOCAB_FOR_BYTE_FALLBACK = 256 + 3 + 32


def matches(head: bytes) -> bool:
    """True when ``head`` (the first bytes of a file) starts like a SentencePiece model: a serialized
    ModelProto, whose first field is a repeated ``pieces`` message (tag 0x0A)."""
    return head[:1] == b"\x0a"


class LlamaTokenizer:
    """SentencePiece tokenizer with Llama's special ids (pad = unk = 0).

    ``add_bos_token`` is MindFormers' default for prompts (its LlamaTokenizer adds ``<s>``).
    Picklable (the model bytes travel), so `datasets.map(num_proc=...)` can ship it to workers.
    """

    type_name = "LlamaTokenizer"
    add_bos_token = True

    def __init__(self, vocab_file: str):
        self.vocab_file = str(vocab_file)
        if not os.path.isfile(self.vocab_file):
            raise DataError(f"tokenizer model file {self.vocab_file!r} does not exist. "
                             "Pass the path of a SentencePiece tokenizer.model.")
        with open(self.vocab_file, "rb") as f:
            self._load(f.read())

    def _load(self, proto: bytes) -> None:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError, TypeError) as e:
            raise DataError(f"tokenizer model file {self.vocab_file!r} is not a valid SentencePiece "
                             f"model ({e}). Pass the tokenizer.model that belongs to the checkpoint.") from None
        if sp.get_piece_size() == 0:
            raise DataError(f"tokenizer model file {self.vocab_file!r} holds an empty vocabulary.")
        self._proto = proto
        self.sp = sp
        self.unk_token_id: int = sp.unk_id()
        self.bos_token_id: int = sp.bos_id()
        self.eos_token_id: int = sp.eos_id()
        # Llama: pad_token "<unk>" (MindFormers LlamaTokenizer and HF both pad with id 0).
        self.pad_token_id: int = sp.pad_id() if sp.pad_id() >= 0 else self.unk_token_id

    def __getstate__(self) -> dict:
        return {"vocab_file": self.vocab_file, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.vocab_file = state["vocab_file"]
        self._load(state["proto"])

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, no bos/eos (one batched sentencepiece call)."""
        return self.sp.encode(list(texts))

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, with `<s>` first / `</s>` last when asked (MindFormers: both on)."""
        ids = self.sp.encode(text)
        if add_bos:
            ids = [self.bos_token_id] + ids
        if add_eos:
            ids = ids + [self.eos_token_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control pieces (`<s>`, `</s>`, `<unk>` as pad) decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


def train_sentencepiece(inputs: str | os.PathLike | Iterable[str], model_prefix: str | os.PathLike,
                        vocab_size: int, *, byte_fallback: bool | None = None,
                        character_coverage: float = 1.0, num_threads: int = 1) -> str:
    """Train a Llama-like BPE SentencePiece model; return the path of `<model_prefix>.model`.

    inputs: a text file, a list of text files, or an iterable of texts. Texts are split on
      newlines (SentencePiece trains on lines), so "\\n" is never a piece and encodes through
      byte fallback as <0x0A>, as in Llama.
    byte_fallback: None picks True when vocab_size leaves room for the 256 byte pieces.
    Deterministic for a given input (no sampling or shuffling of sentences, one thread).
    """
    if byte_fallback is None:
        byte_fallback = vocab_size >= _MIN_VOCAB_FOR_BYTE_FALLBACK
    model_prefix = str(model_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = _as_training_files(inputs, tmp)
        try:
            spm.SentencePieceTrainer.train(
                input=",".join(files), model_prefix=model_prefix, vocab_size=vocab_size,
                model_type="bpe", character_coverage=character_coverage,
                byte_fallback=byte_fallback, split_digits=True, allow_whitespace_only_pieces=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                add_dummy_prefix=True, max_sentencepiece_length=16,
                unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
                input_sentence_size=0, shuffle_input_sentence=False, num_threads=num_threads,
                minloglevel=2)
        except RuntimeError as e:
            raise ValueError(f"sentencepiece training of {model_prefix}.model with vocab_size={vocab_size} "
                             f"failed: {e}. A small corpus needs a smaller vocab_size.") from None
    return model_prefix + ".model"


def _as_training_files(inputs, tmp: str) -> list[str]:
    """A path (or list of paths, all existing files) is used as is; anything else is texts."""
    if isinstance(inputs, (str, os.PathLike)):
        if not os.path.isfile(inputs):
            raise ValueError(f"tokenizer corpus file {str(inputs)!r} does not exist.")
        return [str(inputs)]
    inputs = list(inputs)
    if inputs and all(isinstance(x, (str, os.PathLike)) and os.path.isfile(x) for x in inputs):
        return [str(x) for x in inputs]
    path = os.path.join(tmp, "corpus.txt")
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for text in inputs:
            for line in str(text).split("\n"):
                if line.strip():
                    f.write(line + "\n")
                    n += 1
    if n == 0:
        raise ValueError("train_sentencepiece got no text: pass text files or non-empty strings.")
    return [path]
