"""A MindRecord set as ``dataset_dir``: converted once into a cached dataset directory, then read like
one (``mftune.data.loader.TrainData``), so training sees the records MindSpore's ``MindDataset`` gives,
in its order, with the values it gives.

The conversion streams the set page by page (``mftune.data.mindrecord``) into
``<cache_root>/<name>-<key>/`` with the token columns ``input_ids`` and, when the set has them,
``labels`` (int32, one list per record). A set with ``input_ids`` only (``--dataset_type wiki``) becomes a
dataset with ``input_ids`` only, which mftune labels as it labels its own wiki data (labels = input_ids).
The key hashes, per shard, its name, size and modification time, its header and its ``.db`` index, so
a changed set converts again and an unchanged one is reused at once without reading its pages.
Writing is atomic (``mftune.fileio.atomic_directory``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import numpy as np
import pyarrow as pa

from mftune.data.mindrecord import MindRecordSet, Row, open_mindrecord
from mftune.data.packing import records_column
from mftune.data.preprocess import is_dataset_dir
from mftune.errors import DataError
from mftune.fileio import atomic_directory

logger = logging.getLogger("mftune")
TOKEN_COLUMNS = ("input_ids", "labels")
BATCH_RECORDS = 1024  # records per Arrow batch while converting
CONVERTER_VERSION = b"mftune-mindrecord-1"  # part of the key: a change of the conversion converts again
INT32 = np.iinfo(np.int32)


@dataclass(frozen=True)
class Converted:
    path: str  # the dataset directory
    records: int  # records read from the MindRecord set


def cached_mindrecord(path: str, cache_root: str) -> Converted:
    """The dataset directory holding MindRecord set ``path`` (converted now unless cached)."""
    mr = open_mindrecord(path)
    columns = token_columns(mr)
    # one cache per set, whichever shard names it
    name = os.path.basename(os.path.normpath(path) if os.path.isdir(path) else mr.shards[0].path)
    out = os.path.join(cache_root, f"{name}-{fingerprint(mr)}")
    if is_dataset_dir(out):
        records = len(datasets.load_from_disk(out))
        logger.info("MindRecord %s: using the converted cache %s (%d records)", path, out, records)
        return Converted(out, records)
    start = time.perf_counter()
    with atomic_directory(out) as stage:
        records = write_dataset(mr, columns, stage.path, os.path.join(stage.scratch, "records.arrow"))
    unused = sorted(set(mr.schema) - set(columns))
    logger.info("MindRecord %s: %d records read from %d shard file(s), columns %s%s, converted into %s in %.1f s",
                path, records, len(mr.shards), list(columns), f" (not used: {unused})" if unused else "",
                out, time.perf_counter() - start)
    return Converted(out, records)


def fingerprint(mr: MindRecordSet) -> str:
    digest = hashlib.sha256(CONVERTER_VERSION)
    for shard in mr.shards:
        stat = os.stat(shard.path)
        digest.update(f"{os.path.basename(shard.path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        with open(shard.path, "rb") as f:
            digest.update(f.read(8 + int.from_bytes(f.read(8), "little")))
        with open(shard.path + ".db", "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def token_columns(mr: MindRecordSet) -> tuple[str, ...]:
    """``input_ids`` (and ``labels`` when present): 1-D int32/int64 arrays, or a DataError naming the file."""
    schema, file = mr.schema, mr.shards[0].path
    if "input_ids" not in schema:
        raise DataError(f"{file}: the MindRecord records have no 'input_ids' (their fields: {sorted(schema)}). "
                        f"mftune trains on token ids: write the set with MindFormers' llama_preprocess.py "
                        f"(input_ids, and labels for qa data).")
    columns = tuple(c for c in TOKEN_COLUMNS if c in schema)
    for c in columns:
        spec = schema[c]
        if spec["type"] not in ("int32", "int64") or len(spec.get("shape", ())) != 1:
            raise DataError(f"{file}: the MindRecord field {c!r} is {spec}, not a 1-D int32 or int64 array of "
                            f"token ids. Write the set with MindFormers' llama_preprocess.py.")
    return columns


def write_dataset(mr: MindRecordSet, columns: tuple[str, ...], out: str, scratch_file: str) -> int:
    """Every record's ``columns`` -> an Arrow stream file (batch by batch) -> a dataset directory ``out``."""
    schema = pa.schema([(c, pa.list_(pa.int32())) for c in columns])
    first: list[Row] = []
    records = 0
    with pa.OSFile(scratch_file, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in _batches(mr.rows(list(columns))):
            _check_lengths(batch, columns, first)
            arrays = [records_column(_token_rows(batch, c)) for c in columns]
            writer.write_batch(pa.record_batch([a.combine_chunks() for a in arrays], schema=schema))
            records += len(batch)
    if records == 0:
        raise DataError(f"the MindRecord set {mr.path} holds no records ({len(mr.shards)} shard file(s)). "
                        f"Write it again from non-empty data.")
    datasets.Dataset.from_file(scratch_file).save_to_disk(out)
    return records


def _batches(rows: Iterator[Row]) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) == BATCH_RECORDS:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_lengths(batch: list[Row], columns: tuple[str, ...], first: list[Row]) -> None:
    """Every record as long as the first one (``first`` carries it across batches), labels as long as
    input_ids; a DataError names the record."""
    for row in batch:
        n = len(row.fields["input_ids"])
        if not first:
            first.append(row)
        want = len(first[0].fields["input_ids"])
        if n != want:
            raise DataError(f"{row.shard}: record {row.index} has {n} input_ids, the first record ({first[0].shard} "
                            f"record {first[0].index}) {want}. Every record holds seq_length + 1 tokens: write "
                            f"the set again with MindFormers' llama_preprocess.py.")
        for c in columns[1:]:
            if len(row.fields[c]) != n:
                raise DataError(f"{row.shard}: record {row.index} has {n} input_ids but {len(row.fields[c])} {c}. "
                                f"Each label belongs to one token: write the set again with MindFormers' "
                                f"llama_preprocess.py.")


def _token_rows(batch: list[Row], column: str) -> np.ndarray:
    """The batch's ``column`` as an int32 [records, length] array."""
    values = np.stack([row.fields[column] for row in batch])
    if values.size and (values.min() < INT32.min or values.max() > INT32.max):
        raise DataError(f"{batch[0].shard}: {column} holds values beyond int32 ([{values.min()}, {values.max()}]), "
                        f"which are not token ids. Write the set again with MindFormers' llama_preprocess.py.")
    return values.astype(np.int32)
