"""``llama_preprocess.py --dataset_type wikipedia``: parquet text -> exactly ``samples_num`` records.

MindFormers' Llama 2 tool reads these with ``TrainingDataset`` (``mindformers/dataset/dataloader/
training_dataloader.py``: ``file_format="parquet"``, ``is_align=True``, ``shuffle=False``,
``max_length=seq_length + 1``); this module does what it does, record for record:

- the input is a parquet file, or a directory whose files ending in "parquet" are read in sorted order,
  one file at a time; the text is each file's first column;
- each text is stripped and split on newlines; each non-empty stripped line is tokenized without
  bos/eos and the ids of a file are concatenated;
- the stream is cut into chunks of ``n = seq_length + 1`` ids, MindFormers' way (``pad_func``): after
  each line, when at least ``n`` ids are pending, every chunk that leaves at least one id behind is
  taken and the rest stays pending; exactly ``n`` pending ids are dropped, not taken, and so is what a
  file leaves pending at its end;
- a record is ``bos + chunk[:n - 2] + eos`` (MindFormers' ``prepare_for_model`` with add_bos/add_eos
  and truncation keeps the first ``n - 2`` ids), ``n`` tokens;
- records are taken in order until there are ``samples_num`` (MindFormers' ``--samples_num``, default
  10000); when the files run out first they are read again from the first ("All data files have been
  read, but the number of samples is still not met"), so the count is always ``samples_num``.

A file that yields no chunk is skipped and named in the summary (MindFormers fails with an IndexError
there); no chunk at all is a DataError. The summary counts the lines and text tokens read and the tokens
no record holds (chunk remainders, the two ids per chunk a record cuts, text beyond ``samples_num``).
"""
from __future__ import annotations

import glob
import os
import time

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mftune.data.packing import INT_LIST, records_column
from mftune.data.preprocess import check_output_dir
from mftune.data.records import Summary
from mftune.data.tokenizer_kinds import Tokenizer
from mftune.errors import DataError
from mftune.fileio import atomic_directory

DEFAULT_SAMPLES_NUM = 10000  # MindFormers' --samples_num default


def parquet_files(path: str) -> list[str]:
    """MindFormers' ``_walk_files``: a directory's files ending in "parquet" (sorted), a file, or a glob."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith("parquet"))
    elif os.path.isfile(path):
        files = [path]
    else:
        files = sorted(f for f in glob.glob(os.path.expanduser(path)) if os.path.isfile(f))
    if not files:
        raise DataError(f"--input_glob {path!r} holds no parquet file. Pass a .parquet file or a directory of them.")
    return files


def file_sentences(path: str) -> list[str]:
    """The stripped non-empty lines of the texts in the first column of parquet ``path``."""
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's own error types for a damaged file
        raise DataError(f"{path}: cannot be read as parquet ({e}).") from None
    if table.num_columns == 0:
        raise DataError(f"{path}: the parquet file has no column; the text must be its first column.")
    sentences = []
    for text in table.column(0).to_pylist():
        if not isinstance(text, str):
            raise DataError(f"{path}: the first column holds {type(text).__name__} values, not text. "
                            "Put the text in the first column.")
        sentences += [line.strip() for line in text.strip().split("\n") if line.strip()]
    return sentences


def align(encoded: list[list[int]], n: int) -> list[list[int]]:
    """MindFormers' ``pad_func``: chunks of ``n`` ids from the concatenated ``encoded``, quirks kept."""
    chunks, pending = [], []
    for ids in encoded:
        pending.extend(ids)
        if len(pending) >= n:
            stop = 0
            for start in range(0, len(pending) - n, n):
                chunks.append(pending[start:start + n])
                stop = start
            pending = pending[stop + n:]
    return chunks


def wikipedia_records(files: list[str], tokenizer: Tokenizer, n: int, samples_num: int,
                      counts: Summary | None = None) -> np.ndarray:
    """``samples_num`` records of ``n`` ids, ``(samples_num, n)`` int32, read file after file and round again.
    ``counts``: filled with what was read (files, lines, text tokens of one pass) and what no record holds."""
    out: list[list[int]] = []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    chunks_of: dict[str, list[list[int]]] = {}  # a later pass over the files reads the same chunks
    counts = Summary() if counts is None else counts
    while len(out) < samples_num:
        before = len(out)
        for path in files:
            if path not in chunks_of:
                encoded = tokenizer.encode_batch(file_sentences(path))
                chunks_of[path] = align(encoded, n)
                _count_file(counts, path, encoded, len(chunks_of[path]), n)
            out += [[bos] + c[:n - 2] + [eos] for c in chunks_of[path][:samples_num - len(out)]]
            if len(out) == samples_num:
                break
        if len(out) == before:
            raise DataError(f"{', '.join(files)} hold fewer than seq_length + 1 = {n} tokens of text per file: "
                            "no record. Pass more text or a smaller --seq_length.")
    _count_use(counts, chunks_of, samples_num, n)
    return np.asarray(out, dtype=np.int32).reshape(samples_num, n)


def _count_file(counts: Summary, path: str, encoded: list[list[int]], chunks: int, n: int) -> None:
    counts.files += 1
    counts.samples += len(encoded)
    counts.text_tokens += sum(len(ids) for ids in encoded)
    if not chunks:  # MindFormers fails here (IndexError); mftune reads on, and says so
        counts.notes.append(f"{path} gives no record: its text is fewer than seq_length + 1 = {n} tokens "
                            "(MindFormers cuts each file on its own)")


def _count_use(counts: Summary, chunks_of: dict[str, list[list[int]]], samples_num: int, n: int) -> None:
    """Tokens in no record (chunk remainders, the 2 ids of each chunk the record cuts, chunks beyond
    samples_num) and, when the text gives fewer chunks than samples_num, how often records repeat."""
    available = sum(len(c) for c in chunks_of.values())
    used = min(available, samples_num)
    counts.dropped_tokens = counts.text_tokens - used * (n - 2)
    if available < samples_num:
        counts.notes.append(f"the text gives {available} records and --samples_num is {samples_num}: the files "
                            f"were read again from the first ({samples_num / available:.1f} passes), so records "
                            "repeat (MindFormers does the same)")
    elif available > samples_num:
        counts.notes.append(f"the text gives {available} records; --samples_num {samples_num} keeps the first "
                            f"{samples_num} (the rest of the text is in no record)")


def preprocess_wikipedia(path: str, tokenizer: Tokenizer, seq_length: int, output_dir: str, *,
                         samples_num: int = DEFAULT_SAMPLES_NUM, num_shards: int = 1) -> Summary:
    """Parquet text at ``path`` -> dataset directory of ``samples_num`` ``input_ids`` records (seq_length + 1)."""
    check_output_dir(output_dir)
    files = parquet_files(path)
    n = seq_length + 1
    start = time.perf_counter()
    with atomic_directory(output_dir, lambda: check_output_dir(output_dir)) as stage:
        summary = Summary(unit="lines")
        records = wikipedia_records(files, tokenizer, n, samples_num, summary)
        table = pa.table({"input_ids": records_column(records)})
        out = datasets.Dataset(table).cast(datasets.Features({"input_ids": INT_LIST}))
        summary.records, summary.tokens, summary.positions = samples_num, records.size, records.size
        summary.seconds = time.perf_counter() - start
        out.save_to_disk(stage.path, num_shards=min(num_shards, samples_num))
    return summary
