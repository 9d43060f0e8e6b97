"""Packing: several tokenized samples per record, each attended to on its own.

Records carry ``position_ids`` restarting at 0 for every sample; ``LlamaForCausalLM`` (``packed=True``)
attends within each sample, so a sample's loss and gradients equal the ones it gets alone.
"""
from __future__ import annotations

import bisect

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mftune.data.labelling import IGNORE_TOKEN_ID

INT_LIST = getattr(datasets, "List", datasets.Sequence)(datasets.Value("int32"))  # a token-id column's feature


def pack_samples(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: the sample indices of each record (ascending), with the
    lengths of a record's samples summing to at most ``capacity`` (every length <= capacity).
    Longest samples first, each into the fullest record it still fits in; deterministic."""
    free: list[tuple[int, int]] = []  # (space left, record), sorted
    records: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        j = bisect.bisect_left(free, (lengths[i], -1))
        if j == len(free):
            records.append([i])
            space, r = capacity, len(records) - 1
        else:
            space, r = free.pop(j)
            records[r].append(i)
        if space - lengths[i] > 0:
            bisect.insort(free, (space - lengths[i], r))
    return [sorted(r) for r in records]


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (values, start offsets) numpy arrays."""
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return pc.list_flatten(column).to_numpy(zero_copy_only=False), starts


def records_column(a: np.ndarray) -> pa.ChunkedArray:
    """Rows of a 2-D int32 array as an Arrow list column, in chunks whose int32 offsets cannot overflow."""
    rows = max(1, (2**31 - 1) // max(1, a.shape[1]))
    chunks = []
    for start in range(0, a.shape[0], rows):
        block = a[start:start + rows]
        offsets = np.arange(0, block.size + 1, a.shape[1], dtype=np.int64).astype(np.int32)
        chunks.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(block.ravel())))
    return pa.chunked_array(chunks, type=pa.list_(pa.int32()))


def pack_dataset(ds: datasets.Dataset, record_length: int, pad_id: int) -> datasets.Dataset:
    """Unpadded samples (``input_ids``, ``labels``) -> records of ``record_length`` holding several
    samples each, plus ``position_ids`` restarting at 0 for every sample (and for the padding tail,
    whose labels are -100). A sample's first label is always -100 (<s>), so no token learns to
    predict across a boundary; the model attends within each sample (``LlamaForCausalLM`` packed path)."""
    ds = ds.flatten_indices() if ds._indices is not None else ds  # read the selected rows only
    ids, starts = _flat(ds.data.column("input_ids"))
    labels, _ = _flat(ds.data.column("labels"))
    lengths = pc.list_value_length(ds.data.column("input_ids")).to_numpy(zero_copy_only=False)
    bins = pack_samples(lengths.tolist(), record_length)
    out_ids = np.full((len(bins), record_length), pad_id, dtype=np.int32)
    out_labels = np.full((len(bins), record_length), IGNORE_TOKEN_ID, dtype=np.int32)
    out_pos = np.zeros((len(bins), record_length), dtype=np.int32)
    arange = np.arange(record_length, dtype=np.int32)
    for r, samples in enumerate(bins):
        at = 0
        for i in samples:
            n, s = int(lengths[i]), int(starts[i])
            out_ids[r, at:at + n] = ids[s:s + n]
            out_labels[r, at:at + n] = labels[s:s + n]
            out_pos[r, at:at + n] = arange[:n]
            at += n
        out_pos[r, at:] = arange[:record_length - at]

    table = pa.table({"input_ids": records_column(out_ids), "labels": records_column(out_labels),
                      "position_ids": records_column(out_pos)})
    return datasets.Dataset(table).cast(datasets.Features({c: INT_LIST for c in table.column_names}))
