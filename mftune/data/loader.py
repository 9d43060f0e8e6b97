"""Training batches from a preprocessed dataset directory, in a layout-independent order.

Order contract (what makes resume and re-layout exact):

- Epoch e visits the records in `torch.randperm(N, generator=torch.Generator().manual_seed(seed + e))`
  order (identity when `shuffle=False`). With `repeat` R (``train_dataset.repeat``) an epoch is R passes,
  each batched on its own (MindSpore batches, then repeats): pass p of epoch e uses the order of e*R + p.
- Optimizer step s takes the global positions [s*G, (s+1)*G) of that order, G = global batch =
  micro_batch_size * dp_size * grad_accum.
- Micro-step k of data-parallel rank r takes positions [(k*dp_size + r)*mb, +mb) within the step.

So (dp_size=D, micro_batch_size=m) sees, per micro-step, exactly the samples of (dp_size=1,
micro_batch_size=m*D), and `epoch(e, start_step=s)` equals the full epoch with its first s steps
dropped. Every rank reads the same permutation and only its own rows (MindFormers' full_batch
semantics without the full read).

`drop_remainder=True` (MindFormers' default) drops the last partial step; with False the last step
is completed by wrapping around to the start of the same epoch's order, so every rank still gets
full micro-batches (collectives never see ragged shapes).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import torch


class TrainData:
    """Per-step micro-batches of one data-parallel rank. See the module docstring for the order."""

    def __init__(self, dataset_dir: str, *, micro_batch_size: int, grad_accum: int = 1, dp_rank: int = 0,
                 dp_size: int = 1, shuffle: bool = True, seed: int = 0, drop_remainder: bool = True,
                 num_samples: int | None = None, columns: tuple[str, ...] = ("input_ids", "labels"),
                 repeat: int = 1):
        for name, value in (("micro_batch_size", micro_batch_size), ("grad_accum", grad_accum), ("dp_size", dp_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: it must be an integer >= 1.")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank!r} is invalid: it must be in [0, dp_size={dp_size}).")
        if not isinstance(repeat, int) or repeat < 1:
            raise ValueError(f"repeat={repeat!r} is invalid: it must be an integer >= 1.")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples={num_samples!r} is invalid: it must be >= 1 or None (all records).")
        self.dataset_dir = dataset_dir
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.shuffle, self.seed, self.drop_remainder = shuffle, seed, drop_remainder
        self.global_batch_size = micro_batch_size * dp_size * grad_accum

        ds = _load(dataset_dir)
        # Packed records (llama_preprocess.py --packing) carry position ids restarting per sample.
        self.packed = "position_ids" in ds.column_names
        self.columns = tuple(columns) + (("position_ids",) if self.packed and "position_ids" not in columns else ())
        self.has_labels = "labels" in ds.column_names
        read = [c for c in self.columns if c in ds.column_names]
        for c in self.columns:
            if c not in ds.column_names and not (c == "labels" and "input_ids" in ds.column_names):
                raise ValueError(f"dataset_dir={dataset_dir!r} has no column {c!r} (it has {ds.column_names}). "
                                 "Preprocess it with scripts/llama_preprocess.py.")
        if len(ds) == 0:
            raise ValueError(_no_records(dataset_dir))
        self.record_length = _record_length(ds, read, dataset_dir)
        n = len(ds) if num_samples is None else min(num_samples, len(ds))
        self.num_records = n
        if self.record_length < 2:
            raise ValueError(f"dataset_dir={dataset_dir!r} has records of {self.record_length} tokens; "
                             "records hold seq_length + 1 >= 2 tokens. Re-run scripts/llama_preprocess.py.")
        # Formatting to torch happens on access; rows are read per micro-batch, never all at once.
        self._ds = ds.with_format("torch", columns=read)
        found = self.value_range("position_ids") if self.packed else None
        if found and (found[0] < 0 or found[1] >= self.record_length):
            raise ValueError(f"dataset_dir={dataset_dir!r} has position_ids in [{found[0]}, {found[1]}]; packed "
                             f"records' positions restart at 0 for each sample and stay below the record length "
                             f"{self.record_length}. Re-run scripts/llama_preprocess.py --packing.")

        G = self.global_batch_size
        if drop_remainder and n < G:
            raise ValueError(
                f"dataset_dir={dataset_dir!r} has {n} records (num_samples={num_samples}), fewer than one global batch "
                f"of {G} = micro_batch_size {micro_batch_size} x dp_size {dp_size} x grad_accum {grad_accum}. "
                "Lower batch_size or gradient_accumulation_steps, add data, or disable drop_remainder.")
        self.repeat = repeat  # passes per epoch (MindSpore's batch-then-repeat: each pass batched on its own)
        self.steps_per_pass = n // G if drop_remainder else -(-n // G)
        self.steps_per_epoch = self.steps_per_pass * repeat

    def value_range(self, column: str, exclude: int | None = None) -> tuple[int, int] | None:
        """(min, max) of the token values of ``column`` over all records, ignoring ``exclude``;
        None when there is no such value or column. Read from Arrow, without copying rows."""
        if column not in self._ds.column_names:
            return None
        values = pc.list_flatten(self._ds.data.column(column))
        if exclude is not None:
            values = pc.filter(values, pc.not_equal(values, exclude))
        mm = pc.min_max(values).as_py()
        return None if mm["min"] is None else (mm["min"], mm["max"])

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's record order (int64 positions into the first num_records records)."""
        if not self.shuffle:
            return torch.arange(self.num_records)
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_records, generator=g)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Yields, per optimizer step from start_step, this rank's grad_accum micro-batches, each
        {"input_ids": LongTensor[mb, L], "labels": LongTensor[mb, L]} (+ "position_ids" when packed)."""
        if start_step < 0:
            raise ValueError(f"start_step={start_step} is invalid: it must be >= 0.")
        G, mb, n = self.global_batch_size, self.micro_batch_size, self.num_records
        orders: dict[int, torch.Tensor] = {}
        for step in range(start_step, self.steps_per_epoch):
            done, in_pass = divmod(step, self.steps_per_pass)
            if done not in orders:  # pass p of epoch e: the order of "epoch" e*repeat + p
                orders = {done: self.order(epoch * self.repeat + done)}
            order = orders[done]
            micro = []
            for k in range(self.grad_accum):
                start = in_pass * G + (k * self.dp_size + self.dp_rank) * mb
                positions = torch.arange(start, start + mb) % n  # wraps only in the last step, drop_remainder=False
                micro.append(self.rows(order[positions]))
            yield micro

    def rows(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The records at dataset ``indices``, as LongTensors of this loader's columns."""
        rows = self._ds[indices.tolist()]
        out = {c: (torch.stack(v) if isinstance(v, list) else v).long() for c, v in rows.items()}
        if "labels" in self.columns and "labels" not in out:
            out["labels"] = out["input_ids"].clone()
        return {c: out[c] for c in self.columns}


def _load(dataset_dir: str) -> datasets.Dataset:
    if not os.path.isdir(dataset_dir):
        raise ValueError(f"dataset_dir={dataset_dir!r} does not exist. Create it with scripts/llama_preprocess.py "
                         "--output_file DIR and pass DIR as --train_dataset_dir.")
    if _saved_without_data(dataset_dir):  # datasets cannot load a set saved with 0 rows in 0 files
        raise ValueError(_no_records(dataset_dir))
    try:
        ds = datasets.load_from_disk(dataset_dir)
    except (FileNotFoundError, ValueError, OSError, IndexError, KeyError) as e:
        raise ValueError(f"dataset_dir={dataset_dir!r} is not a dataset saved with datasets' save_to_disk ({e}). "
                         "Create it with scripts/llama_preprocess.py.") from None
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"dataset_dir={dataset_dir!r} holds splits {list(ds)}, not one dataset. "
                         f"Pass one split's directory, e.g. {os.path.join(dataset_dir, next(iter(ds), 'train'))!r}.")
    return ds


def _saved_without_data(dataset_dir: str) -> bool:
    """A save_to_disk directory whose state.json lists no data file (what a set of 0 rows writes)."""
    try:
        with open(os.path.join(dataset_dir, "state.json"), encoding="utf-8") as f:
            return json.load(f).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False  # no readable state.json: load_from_disk says what it is


def _no_records(dataset_dir: str) -> str:
    return (f"dataset_dir={dataset_dir!r} holds no records (a dataset of 0 rows): there is nothing to train on. "
            f"Preprocess a non-empty input with scripts/llama_preprocess.py, or pass another dataset.")


def _record_length(ds: datasets.Dataset, columns: list[str], dataset_dir: str) -> int:
    """The common length of every row of `columns`, read from Arrow list lengths (no row copies)."""
    lengths: set[int] = set()
    for c in columns:
        col = ds.data.column(c)
        if len(col) == 0:
            continue
        try:
            lens = pc.list_value_length(col)
        except Exception:  # noqa: BLE001 - not a list column
            raise ValueError(f"dataset_dir={dataset_dir!r}: column {c!r} is not a token sequence "
                             f"(type {col.type}).") from None
        mm = pc.min_max(lens).as_py()
        lengths.update({mm["min"], mm["max"]})
        if col.null_count:
            raise ValueError(f"dataset_dir={dataset_dir!r}: column {c!r} has {col.null_count} empty (null) "
                             "records. Re-run scripts/llama_preprocess.py.")
        if not pa.types.is_integer(col.type.value_type):
            raise ValueError(f"dataset_dir={dataset_dir!r}: column {c!r} holds {col.type.value_type}, not token "
                             "ids (a list of ints per record). Re-run scripts/llama_preprocess.py.")
    if len(lengths) > 1:
        raise ValueError(f"dataset_dir={dataset_dir!r} has records of different lengths {sorted(lengths)} in "
                         f"{columns}; every record must be seq_length + 1 tokens. Re-run scripts/llama_preprocess.py.")
    return lengths.pop() if lengths else 0
