"""Hugging Face ``tokenizer.json`` tokenizers (the ``tokenizers`` library), and what a model directory
says about its tokenizer: special tokens, eos ids, chat template.

``LlamaTokenizerFast`` (MindFormers' name for the ``tokenizer.json`` kind) reads the file with
``tokenizers.Tokenizer.from_file`` (Rust, batched and multi-threaded), so byte-level BPE tokenizers
(Llama 3, SmolLM, Qwen-style) and the fast Llama 2 tokenizer give the ids transformers'
``AutoTokenizer`` gives. Encoding never applies the file's post-processor: ``encode`` places bos/eos
itself, as the other kinds do; ``add_bos_token`` says whether transformers' ``encode(text)`` starts
with bos (``tokenizer_config.json``'s ``add_bos_token``, else what the post-processor does).

The directory of the file is read the way ``AutoTokenizer.from_pretrained`` reads it
(``read_directory_meta``): ``bos_token``/``eos_token``/``unk_token``/``pad_token`` from
``tokenizer_config.json`` then ``special_tokens_map.json`` (strings or ``{"content": ...}`` objects);
the chat template from ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named
templates whose ``default`` is taken), else ``chat_template.jinja``, else ``chat_template.json``.
``config.json`` and ``generation_config.json`` add the model's eos ids (an int or a list: Llama 3
Instruct stops at ``<|end_of_text|>``, ``<|eom_id|>`` and ``<|eot_id|>``) and a pad id where the
tokenizer names none.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer as RustTokenizer

from mftune.errors import DataError

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
TOKENIZER_JSON = "tokenizer.json"


def matches(head: bytes) -> bool:
    """True when ``head`` (the first bytes of a file) starts like a tokenizer.json: a JSON object whose first
    keys (the tokenizers library writes ``version``, ``truncation``, ``padding``, ``added_tokens`` first;
    ``model`` comes last) are there."""
    return head.lstrip()[:1] == b"{" and (b'"version"' in head or b'"added_tokens"' in head)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}). Restore the file from the model's download.") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def _chat_template(directory: str, config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    template = _read_json(os.path.join(directory, "chat_template.json")).get("chat_template")
    return template if isinstance(template, str) else None


def read_directory_meta(directory: str) -> dict:
    """What a Hugging Face model directory says about its tokenizer (see the module docstring):
    ``special_tokens`` ({bos_token: text, ...}), ``add_bos_token`` (None when unsaid), ``chat_template``,
    ``model_eos_ids`` and ``model_pad_id``/``model_bos_id`` (config.json, generation_config.json)."""
    config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    special_map = _read_json(os.path.join(directory, "special_tokens_map.json"))
    model = _read_json(os.path.join(directory, "config.json"))
    generation = _read_json(os.path.join(directory, "generation_config.json"))
    special = {}
    for key in SPECIAL_KEYS:
        text = _token_text(config.get(key)) or _token_text(special_map.get(key))
        if text is not None:
            special[key] = text
    add_bos = config.get("add_bos_token")
    eos_ids = _ids(generation.get("eos_token_id")) + _ids(model.get("eos_token_id"))
    pad = next((p for p in (generation.get("pad_token_id"), model.get("pad_token_id")) if isinstance(p, int)), None)
    bos = next((b for b in (generation.get("bos_token_id"), model.get("bos_token_id")) if isinstance(b, int)), None)
    return {"special_tokens": special, "add_bos_token": add_bos if isinstance(add_bos, bool) else None,
            "chat_template": _chat_template(directory, config), "model_eos_ids": list(dict.fromkeys(eos_ids)),
            "model_pad_id": pad, "model_bos_id": bos}


class HFTokenizer:
    """A ``tokenizer.json`` tokenizer with the special tokens of its directory (module docstring).

    ``eos_token_id`` is the tokenizer's eos (what data preparation appends); ``stop_token_ids`` every id
    that ends generation (that eos plus the model's eos ids). ``pad_token_id``: the tokenizer's pad, else
    the model's, else unk, else eos. ``bos_token_id`` is None for tokenizers without one (Qwen-style).
    Picklable (the JSON text travels) for ``datasets.map(num_proc=...)``.
    """

    type_name = "LlamaTokenizerFast"

    def __init__(self, vocab_file: str):
        self.vocab_file = str(vocab_file)
        if not os.path.isfile(self.vocab_file):
            raise DataError(f"tokenizer file {self.vocab_file!r} does not exist. Pass the model's tokenizer.json "
                            "or its directory.")
        with open(self.vocab_file, encoding="utf-8") as f:
            text = f.read()
        self._load(text, read_directory_meta(os.path.dirname(os.path.abspath(self.vocab_file))))

    def _load(self, text: str, meta: dict) -> None:
        try:
            self.tok = RustTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises its own Exception type for a malformed file
            raise DataError(f"tokenizer file {self.vocab_file!r} is not a tokenizers-library tokenizer.json ({e}). "
                            "Pass the tokenizer.json that belongs to the checkpoint.") from None
        self._json, self.meta = text, meta
        self.special_tokens_map: dict[str, str] = dict(meta["special_tokens"])
        self.chat_template: str | None = meta["chat_template"]
        ids = {key: self._id_of(key) for key in SPECIAL_KEYS}
        self.bos_token_id: int | None = ids["bos_token"] if ids["bos_token"] is not None else meta["model_bos_id"]
        self.unk_token_id: int | None = ids["unk_token"]
        eos = ids["eos_token"] if ids["eos_token"] is not None else (meta["model_eos_ids"] or [None])[0]
        if eos is None:
            raise DataError(f"tokenizer {self.vocab_file!r}: no eos token (eos_token in tokenizer_config.json, or "
                            "eos_token_id in config.json / generation_config.json). Add one of them.")
        self.eos_token_id: int = eos
        self.stop_token_ids: list[int] = list(dict.fromkeys([eos, *meta["model_eos_ids"]]))
        pads = (ids["pad_token"], meta["model_pad_id"], self.unk_token_id, eos)
        self.pad_token_id: int = next(p for p in pads if p is not None)
        self.add_bos_token: bool = meta["add_bos_token"] if meta["add_bos_token"] is not None else self._post_bos()

    def _id_of(self, key: str) -> int | None:
        text = self.special_tokens_map.get(key)
        return None if text is None else self.tok.token_to_id(text)

    def _post_bos(self) -> bool:
        """Whether the file's post-processor puts bos first (transformers' encode(text) then starts with it)."""
        if self.bos_token_id is None:
            return False
        ids = self.tok.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_token_id and ids != self.tok.encode("a", add_special_tokens=False).ids

    def __getstate__(self) -> dict:
        return {"vocab_file": self.vocab_file, "json": self._json, "meta": self.meta}

    def __setstate__(self, state: dict) -> None:
        self.vocab_file = state["vocab_file"]
        self._load(state["json"], state["meta"])

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, no bos/eos (one parallel call of the Rust tokenizer); special tokens' texts
        become their ids, as in transformers."""
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Ids of each text and each id's ``(start, end)`` character span in it (for label masks)."""
        return [(e.ids, e.offsets) for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``, with bos first / eos last when asked (no bos when the tokenizer has none)."""
        ids = self.encode_batch([text])[0]
        bos = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []
        return bos + ids + ([self.eos_token_id] if add_eos else [])

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without special tokens (transformers' ``skip_special_tokens=True``)."""
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)
