"""Raw instruction data as ``dataset_dir``: tokenized on first use, cached, reused.

A ``.json`` file (a list of alpaca records ``{instruction, input, output}``, of conversation
records ``{conversations: [{from, value}, ...]}`` or, for the Jinja templates, ``{messages: [{role, content}]}``), a ``.jsonl`` file of such records, or a
``.parquet`` file of them is turned into the records ``scripts/llama_preprocess.py`` writes (the
tokenizer kind the file is (``vocab_file`` may be a Hugging Face directory), the Vicuna template unless told otherwise, labels masked as MindFormers
does, seq_length + 1 tokens) under
``<cache_root>/<file name>-<key>/``. The key hashes the file's bytes, the tokenizer model's bytes, the
template, seq_length and packing, so a change of any of them tokenizes again and an unchanged run
starts at once. ``packing`` packs several conversations per record, as ``--packing`` does. Writing is
atomic (preprocess' own temporary folder + rename).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import pyarrow.parquet as pq

from mftune.data.conversation import get_default_conv_template
from mftune.data.preprocess import is_dataset_dir, load_tokenizer, preprocess_conversations
from mftune.data.records import convert_alpaca, read_json_records
from mftune.data.templates import DEFAULT_TEMPLATE
from mftune.data.tokenizer_kinds import resolve_vocab_file
from mftune.errors import DataError

logger = logging.getLogger("mftune")
RAW_SUFFIXES = (".json", ".jsonl", ".parquet")


def is_raw(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(RAW_SUFFIXES)


def read_raw_records(path: str) -> list:
    if path.endswith(".json"):
        return read_json_records(path)
    if path.endswith(".jsonl"):
        records = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: line {n} is not valid JSON ({e.msg}).") from None
        return records
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's own error types for a damaged file
        raise DataError(f"{path}: cannot be read as parquet ({e}).") from None


# files beside a tokenizer that change what a chat template renders (hashed for non-Vicuna templates)
_TEMPLATE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


def cache_key(path: str, vocab_file: str, seq_length: int, packing: bool = False, template: str | None = None,
              tokenizer_type: str | None = None) -> str:
    """Hash of the data file, the tokenizer file (a directory: the file it resolves to), the template and its
    files (tokenizer_config.json, chat_template.*), seq_length and packing."""
    digest = hashlib.sha256()
    vocab_file = resolve_vocab_file(vocab_file, tokenizer_type)
    files = [path, vocab_file]
    if template not in (None, DEFAULT_TEMPLATE):
        folder = os.path.dirname(os.path.abspath(vocab_file))
        files += [p for p in (os.path.join(folder, n) for n in _TEMPLATE_FILES) if os.path.isfile(p)]
    for file in files:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    digest.update(repr(get_default_conv_template("vicuna")).encode())
    digest.update(str(seq_length).encode())
    if packing:  # unpacked keys stay what earlier versions wrote
        digest.update(b"packing")
    if template not in (None, DEFAULT_TEMPLATE):  # so do Vicuna keys
        digest.update(f"template={template}".encode())
        digest.update(b"alpaca=plain")  # alpaca records without the Alpaca preamble (new keys, not old caches)
    return digest.hexdigest()[:16]


RECORDS_PER_PROCESS = 5000  # below this a tokenizer process costs more to start than it saves


def cached_dataset(path: str, vocab_file: str | None, seq_length: int, cache_root: str,
                   packing: bool = False, num_proc: int = 1, tokenizer_type: str | None = None,
                   template: str | None = None) -> str:
    """The dataset directory for raw ``path`` (built now unless cached, with up to ``num_proc``
    tokenizer processes); ``tokenizer_type`` (processor.tokenizer.type) must fit the file when given,
    ``template`` names the conversation template (None: Vicuna). DataError names the fix."""
    if not vocab_file:
        raise DataError(f"dataset_dir={path} is a raw data file: tokenizing it needs processor.tokenizer.vocab_file "
                        f"(the tokenizer file or its directory). Set it (or pretrained_model_dir), or preprocess with "
                        f"scripts/llama_preprocess.py.")
    name = os.path.basename(path).rsplit(".", 1)[0]
    key = cache_key(path, vocab_file, seq_length, packing, template, tokenizer_type)
    out = os.path.join(cache_root, f"{name}-{key}")
    if is_dataset_dir(out):
        logger.info("Dataset %s: using the tokenized cache %s", path, out)
        return out
    records = read_raw_records(path)
    alpaca = bool(records) and isinstance(records[0], dict) and "instruction" in records[0]
    if alpaca:
        # Vicuna: MindFormers' alpaca_converter prompt; a chat template frames the bare instruction itself
        records, _ = convert_alpaca(records, file=path, plain=template not in (None, DEFAULT_TEMPLATE))
    tokenizer = load_tokenizer(vocab_file, tokenizer_type)
    summary = preprocess_conversations([(path, records)], tokenizer, seq_length, out, packing=packing,
                                       template=template,
                                       num_proc=max(1, min(num_proc, len(records) // RECORDS_PER_PROCESS)))
    logger.info("Dataset %s (%s records) tokenized into %s: %s", path, "alpaca" if alpaca else "conversation",
                out, summary.line())
    return out
