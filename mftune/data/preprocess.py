"""Alpaca -> conversation JSON -> tokenized dataset directory (MindFormers' llama data tools).

Two steps, as in MindFormers' `mindformers/tools/dataset_preprocess/llama/`:

1. `convert_alpaca`: alpaca records `{instruction, input, output}` -> `{"id", "conversations":
   [{"from": "human", "value": <alpaca prompt>}, {"from": "gpt", "value": output}]}`.
2. `preprocess_qa` (`--dataset_type qa`): each conversation in a template (`mftune.data.templates`;
   default Vicuna v1.1, tokenized and labelled exactly as MindFormers' `llama_preprocess.py` does for
   Llama 2 and Llama 3), written with datasets' `save_to_disk` instead of MindRecord.
   `preprocess_wiki` (`--dataset_type wiki`): plain text cut into seq_length+1 token chunks.

Records are `seq_length + 1` tokens (the model shifts by one). Malformed records are reported as
`RecordError` (file, record index, field); `on_error="skip"` drops them and counts them,
`on_error="fail"` raises the first. Output is written to a temporary directory next to the target
and renamed into place, so a failure never leaves a half-written dataset.
"""
from __future__ import annotations

import glob
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mftune.data.packing import INT_LIST, pack_dataset, records_column
from mftune.data.records import (DEFAULT_MAX_SKIPPED_RATIO, OnError, Summary, check_skipped, collect,
                                  read_json_records, utf8_text)
from mftune.data.templates import get_template
from mftune.data.tokenizer_kinds import Tokenizer, build_tokenizer
from mftune.errors import DataError
from mftune.fileio import atomic_directory, atomic_open


def expand_input_glob(pattern: str) -> list[str]:
    files = sorted(f for f in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(f))
    if not files:
        raise DataError(f"--input_glob {pattern!r} matches no file.")
    return files


def load_tokenizer(model_file: str, type_name: str | None = None) -> Tokenizer:
    """The tokenizer of ``model_file`` (its kind from the file; ``type_name`` must agree when given)."""
    return build_tokenizer(model_file, type_name)


def preprocess_qa(input_files: list[str], tokenizer: Tokenizer, seq_length: int, output_dir: str,
                  **kwargs: Any) -> Summary:
    """Conversation JSON files -> dataset directory (``preprocess_conversations``, same keywords)."""
    return preprocess_conversations(((path, read_json_records(path)) for path in input_files), tokenizer,
                                    seq_length, output_dir, **kwargs)


def preprocess_conversations(sources: Iterable[tuple[str, list]], tokenizer: Tokenizer, seq_length: int,
                             output_dir: str, *, on_error: OnError = "skip", num_proc: int = 1, num_shards: int = 1,
                             packing: bool = False, template: str | None = None,
                             max_skipped_ratio: float = DEFAULT_MAX_SKIPPED_RATIO, setting: str = "--max_skipped_ratio",
                             prior: Summary | None = None, keep: Callable[[str, Summary], None] | None = None
                             ) -> Summary:
    """Conversation records, as ``(file name, records)`` pairs -> dataset directory with `input_ids`,
    `labels` (int32, seq_length+1), each conversation in ``template`` (None: MindFormers' Vicuna v1.1;
    ``llama2``/``chatml``/``hf`` also take ``{"messages": [{role, content}]}`` records and system turns);
    with ``packing``, several conversations per record and a `position_ids` column (``pack_dataset``).
    Malformed records are skipped (``on_error``), and nothing is written when more than
    ``max_skipped_ratio`` of them are (``check_skipped``; ``setting`` names its key). ``prior``: the summary
    of the step that made these records (alpaca conversion), whose skipped records count as read and skipped.
    ``keep(directory, summary)`` writes more files into the new directory before it is renamed into place."""
    check_output_dir(output_dir)
    chat = get_template(template, tokenizer)
    summary = Summary(packed=packing)
    if prior is not None:
        summary.read = summary.skipped = prior.skipped
        summary.errors = list(prior.errors)
    names, prompts = _prompts(sources, chat.sample_text, on_error, summary)
    if not prompts:
        first = f" (first: {summary.errors[0]})" if summary.errors else ""
        raise DataError(f"no valid record in {', '.join(names)}: {summary.skipped} malformed{first}.")
    check_skipped(summary, max_skipped_ratio, setting, ", ".join(names))
    record_length = seq_length + 1
    features = datasets.Features({"input_ids": INT_LIST, "labels": INT_LIST, "_truncated": datasets.Value("bool"),
                                  "_tokens": datasets.Value("int64"), "_labelled": datasets.Value("int64")})
    start = time.perf_counter()
    with atomic_directory(output_dir, lambda: check_output_dir(output_dir)) as stage:
        ds = datasets.Dataset.from_dict({"text": prompts},
                                        features=datasets.Features({"text": datasets.Value("string")}))
        ds = ds.map(chat.tokenize_batch, batched=True, batch_size=256, remove_columns=["text"], features=features,
                    fn_kwargs={"tokenizer": tokenizer, "record_length": record_length, "pad": not packing},
                    num_proc=num_proc if num_proc > 1 and len(ds) > 1 else None,
                    cache_file_name=os.path.join(stage.scratch, "cache", "tokenized.arrow"),
                    new_fingerprint=uuid.uuid4().hex, desc="Tokenizing")
        table = ds.data
        summary.samples = len(ds)
        summary.truncated = pc.sum(table.column("_truncated").cast(pa.int64())).as_py() or 0
        summary.tokens = pc.sum(table.column("_tokens")).as_py()
        labelled = table.column("_labelled").to_numpy()
        summary.fully_masked = int((labelled == 0).sum())
        _check_trainable(summary, names, record_length, chat.name)
        ds = ds.remove_columns(["_truncated", "_tokens", "_labelled"])
        if packing:
            ds = pack_dataset(ds, record_length, tokenizer.pad_token_id)
        summary.records = len(ds)
        summary.positions = len(ds) * record_length
        summary.ignored_labels = summary.positions - int(labelled.sum())
        summary.seconds = time.perf_counter() - start
        ds.save_to_disk(stage.path, num_shards=min(num_shards, max(1, len(ds))))
        if keep is not None:
            keep(stage.path, summary)
    return summary


def _check_trainable(summary: Summary, names: list[str], record_length: int, template: str) -> None:
    """A dataset whose every sample is fully masked would train at loss 0 and learn nothing: a DataError."""
    if summary.fully_masked < summary.samples:
        return
    cut = f"{summary.truncated} were cut at seq_length + 1 = {record_length} tokens before their answers"
    rest = summary.samples - summary.truncated
    raise DataError(f"no sample of {', '.join(names)} has a token to train on: all {summary.samples} are "
                    f"fully masked ({cut}" + (f"; {rest} have no answer tokens under template {template}"
                                               if rest else "") +
                    "). Raise seq_length, or check the conversation template.")


def _prompts(sources: Iterable[tuple[str, list]], sample_text, on_error: OnError,
             summary: Summary) -> tuple[list[str], list[str]]:
    """(the file names, the templated text of each valid record of them), the rest counted in ``summary``."""
    names: list[str] = []
    prompts: list[str] = []
    for name, records in sources:
        names.append(name)
        prompts += collect(records, name, on_error, summary, sample_text)
    return names, prompts


def clean_wikitext(s: str) -> str:
    """Undo WikiText's tokenisation artefacts (MindFormers `clean_wikitext`, trimmed to the common cases)."""
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                 (" ! ", "! "), (" ? ", "? "), (" , ", ", "), (" \n", "\n"), ("\n ", "\n"), (" 's", "'s")):
        s = s.replace(a, b)
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    return re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)


def _tokenize_paragraphs(batch: dict, tokenizer: Tokenizer) -> dict:
    return {"ids": [tokenizer.encode(p, add_bos=True, add_eos=True) for p in batch["text"]]}


def preprocess_wiki(input_files: list[str], tokenizer: Tokenizer, seq_length: int, output_dir: str, *,
                    repeat: int = 1, num_shards: int = 1, num_proc: int = 1) -> Summary:
    """Plain text -> `input_ids` chunks of exactly seq_length+1 tokens (the tail shorter than that is dropped).

    As MindFormers: paragraphs (split on blank lines, "= heading =" lines skipped) are tokenized
    with <s> and </s> (``num_proc`` processes) and concatenated; the stream is repeated `repeat`
    times, then chunked. Records span paragraph boundaries, as pretraining data does.
    """
    check_output_dir(output_dir)
    paragraphs: list[str] = []
    notes = []
    for path in input_files:
        with open(path, "rb") as f:
            text = utf8_text(f.read(), path)
        found = [p for p in clean_wikitext(text).split("\n\n") if p and not p.strip().startswith("=")]
        if not found:
            notes.append(f"{path} holds no text paragraph (only blank or '= heading =' lines): nothing read from it")
        paragraphs += found
    n = seq_length + 1
    if not paragraphs:
        raise DataError(f"{', '.join(input_files)} hold no text paragraphs (only blank or '= heading =' lines), "
                        f"fewer than one record of seq_length + 1 = {n} tokens. Pass files with text.")
    start = time.perf_counter()
    with atomic_directory(output_dir, lambda: check_output_dir(output_dir)) as stage:
        ds = datasets.Dataset.from_dict({"text": paragraphs},
                                        features=datasets.Features({"text": datasets.Value("string")}))
        ds = ds.map(_tokenize_paragraphs, batched=True, batch_size=256, remove_columns=["text"],
                    features=datasets.Features({"ids": INT_LIST}), fn_kwargs={"tokenizer": tokenizer},
                    num_proc=num_proc if num_proc > 1 and len(ds) > 1 else None,
                    cache_file_name=os.path.join(stage.scratch, "cache", "tokenized.arrow"),
                    new_fingerprint=uuid.uuid4().hex, desc="Tokenizing")
        content = np.tile(pc.list_flatten(ds.data.column("ids")).to_numpy(zero_copy_only=False), repeat)
        records = len(content) // n
        if records == 0:
            raise DataError(f"{', '.join(input_files)} hold {len(content)} tokens, fewer than one record of "
                            f"seq_length + 1 = {n}. Pass more text or a smaller --seq_length.")
        table = pa.table({"input_ids": records_column(content[:records * n].astype(np.int32).reshape(records, n))})
        out = datasets.Dataset(table).cast(datasets.Features({"input_ids": INT_LIST}))
        text = len(content) // repeat
        summary = Summary(records=records, samples=len(paragraphs), tokens=records * n, positions=records * n,
                          seconds=time.perf_counter() - start, files=len(input_files), unit="paragraphs",
                          text_tokens=text, dropped_tokens=len(content) - records * n, notes=notes)
        if repeat > 1:
            summary.notes.append(f"the text ({text} tokens) was repeated {repeat} times (--repeat) before cutting "
                                 "into records")
        out.save_to_disk(stage.path, num_shards=min(num_shards, max(1, records)))
    return summary


# ---------------------------------------------------------------------------------------------
# Atomic output
# ---------------------------------------------------------------------------------------------

def is_dataset_dir(path: str) -> bool:
    """True for a directory written by `save_to_disk` (a Dataset or a DatasetDict)."""
    return any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def check_output_dir(path: str) -> None:
    """Refuse to replace anything but a previous dataset directory (or an empty one)."""
    if os.path.isdir(path):
        if os.listdir(path) and not is_dataset_dir(path):
            raise DataError(f"output {path!r} exists and is not a dataset directory; refusing to overwrite it. "
                            "Pass a new --output_file or remove the directory.")
    elif os.path.exists(path):
        raise DataError(f"output {path!r} exists and is a file; refusing to overwrite it. Pass a new --output_file.")


def write_json_atomic(obj: Any, path: str) -> None:
    """json.dump (indent 2, UTF-8 kept, as alpaca_converter), atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
