"""Raw instruction data as ``dataset_dir``: tokenized on first use, cached, reused.

A ``.json`` file (a list of alpaca records ``{instruction, input, output}``, of conversation
records ``{conversations: [{from, value}, ...]}`` or, for the Jinja templates, ``{messages: [{role, content}]}``), a ``.jsonl`` file of such records, or a
``.parquet`` file of them is turned into the records ``scripts/llama_preprocess.py`` writes (the
tokenizer kind the file is (``vocab_file`` may be a Hugging Face directory), the Vicuna template unless told otherwise, labels masked as MindFormers
does, seq_length + 1 tokens) under
``<cache_root>/<file name>-<key>/``. The key hashes the file's bytes, the tokenizer model's bytes, the
template, seq_length and packing, so a change of any of them tokenizes again and an unchanged run
starts at once. ``packing`` packs several conversations per record, as ``--packing`` does. Writing is
atomic (preprocess' own temporary folder + rename). Malformed records are skipped, named in the log and
counted (alpaca conversion and templating together); more than ``max_skipped_ratio`` of those read stops
the run, also when a cache built with a higher ratio is reused (its counts are kept beside it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import pyarrow.parquet as pq

from mftune.data.conversation import get_default_conv_template
from mftune.data.preprocess import is_dataset_dir, load_tokenizer, preprocess_conversations
from mftune.data.records import (DEFAULT_MAX_SKIPPED_RATIO, NAMED_SKIPS, Summary, check_skipped, convert_alpaca,
                                  first_skipped, read_json_records, read_jsonl_records, require_records)
from mftune.data.templates import DEFAULT_TEMPLATE
from mftune.data.tokenizer_kinds import resolve_vocab_file
from mftune.errors import DataError
from mftune.fileio import atomic_open

logger = logging.getLogger("mftune")
RAW_SUFFIXES = (".json", ".jsonl", ".parquet")


def is_raw(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(RAW_SUFFIXES)


def read_raw_records(path: str) -> list:
    """The records of a raw ``.json``, ``.jsonl`` or ``.parquet`` file; DataError naming the file when it
    cannot be read, is not UTF-8 JSON (the byte offset named) or holds no record."""
    if path.endswith(".json"):
        return read_json_records(path)
    if path.endswith(".jsonl"):
        return read_jsonl_records(path)
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's own error types for a damaged file
        raise DataError(f"{path}: cannot be read as parquet ({e}).") from None
    return require_records(records, path, "a parquet table of 0 rows")


def is_alpaca(records: list) -> bool:
    """Whether ``records`` are alpaca records: the first object with a record's keys decides, so that a
    first record missing ``instruction`` (or not an object) is reported as malformed alpaca, not as a
    conversation record without ``conversations``."""
    for record in records:
        if isinstance(record, dict) and record.keys() & {"instruction", "output", "conversations", "messages"}:
            return not record.keys() & {"conversations", "messages"}
    return False


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
                   template: str | None = None, max_skipped_ratio: float = DEFAULT_MAX_SKIPPED_RATIO,
                   setting: str = "train_dataset.max_skipped_ratio") -> str:
    """The dataset directory for raw ``path`` (built now unless cached, with up to ``num_proc``
    tokenizer processes); ``tokenizer_type`` (processor.tokenizer.type) must fit the file when given,
    ``template`` names the conversation template (None: Vicuna). More than ``max_skipped_ratio`` malformed
    records (``setting``) is an error, for a cache built earlier too (its counts are kept beside it, in
    COUNTS_FILE). DataError names the fix."""
    if not vocab_file:
        raise DataError(f"dataset_dir={path} is a raw data file: tokenizing it needs processor.tokenizer.vocab_file "
                        f"(the tokenizer file or its directory). Set it (or pretrained_model_dir), or preprocess with "
                        f"scripts/llama_preprocess.py.")
    name = os.path.basename(path).rsplit(".", 1)[0]
    key = cache_key(path, vocab_file, seq_length, packing, template, tokenizer_type)
    out = os.path.join(cache_root, f"{name}-{key}")
    if is_dataset_dir(out):
        summary = _cached_counts(out)
        logger.info("Dataset %s: using the tokenized cache %s%s", path, out,
                    f" ({summary.read} records read, {summary.records} written)" if summary else "")
        if summary:
            _report_skipped(path, summary)
            check_skipped(summary, max_skipped_ratio, setting, path)
        return out
    records = read_raw_records(path)
    alpaca, converted = is_alpaca(records), None
    if alpaca:
        # Vicuna: MindFormers' alpaca_converter prompt; a chat template frames the bare instruction itself
        records, converted = convert_alpaca(records, file=path, plain=template not in (None, DEFAULT_TEMPLATE))
    tokenizer = load_tokenizer(vocab_file, tokenizer_type)
    summary = preprocess_conversations([(path, records)], tokenizer, seq_length, out, packing=packing,
                                       template=template, max_skipped_ratio=max_skipped_ratio, setting=setting,
                                       prior=converted, keep=_keep_counts,  # in the cache before it is in place
                                       num_proc=max(1, min(num_proc, len(records) // RECORDS_PER_PROCESS)))
    logger.info("Dataset %s (%s records) tokenized into %s: %s", path, "alpaca" if alpaca else "conversation",
                out, summary.line())
    _report_skipped(path, summary)
    return out


COUNTS_FILE = "mftune_counts.json"  # a cache's Summary (without tokens): its skipped records count on reuse


def _report_skipped(path: str, summary: Summary | None) -> None:
    if summary and summary.skipped:
        logger.warning("Dataset %s: skipped %d malformed record(s) of %d read: %s", path, summary.skipped,
                       summary.read, first_skipped(summary.errors, path))


def _keep_counts(out: str, summary: Summary) -> None:
    counts = {f.name: getattr(summary, f.name) for f in dataclasses.fields(Summary) if f.name != "errors"}
    counts["errors"] = [str(e) for e in summary.errors[:NAMED_SKIPS]]
    with atomic_open(os.path.join(out, COUNTS_FILE), "w", encoding="utf-8") as f:
        json.dump(counts, f)


def _cached_counts(out: str) -> Summary | None:
    """The Summary kept beside a cache (None for a cache of an earlier version, or an unreadable file)."""
    try:
        with open(os.path.join(out, COUNTS_FILE), encoding="utf-8") as f:
            return Summary(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None
