"""MindRecord sets read without MindSpore (mftune.data.mindrecord, mftune.data.mindrecord_cache).

Fixtures are written by tests/mindrecord_files.py, whose files MindSpore's own reader reads as written
(tests/e2e/test_mindrecord_runs.py); the records each test expects are the ones it wrote."""
from __future__ import annotations

import json
import logging
import os
import re

import datasets
import numpy as np
import pytest
import torch

from mindrecord_files import QA_SCHEMA, WIKI_SCHEMA, compress_int, pack, write_mindrecord
from mftune.config.schema import MFConfig
from mftune.data.dataset import open_dataset
from mftune.data.loader import TrainData
from mftune.data.mindrecord import is_mindrecord_dir, open_mindrecord, read_header
from mftune.data.mindrecord_values import uncompress_int, unpack_msgpack
from mftune.data.mindrecord_cache import cached_mindrecord
from mftune.errors import DataError
from mftune.models.config import LlamaConfig

L = 9  # tokens per record (seq_length 8 + 1)
MIXED = {"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int64", "shape": [-1]},
         "f": {"type": "float32", "shape": [2, -1]}, "n": {"type": "int32"}, "s": {"type": "string"},
         "x": {"type": "float64"}, "b": {"type": "bytes"}}


def qa_records(n: int, seed: int = 0) -> list[dict]:
    """Token ids of every integer width (so compression uses 1, 2 and 4 bytes), labels with -100."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = rng.integers(0, 32000, L).astype(np.int32)
        ids[:3] = (i, 129, 1 << 20)  # int8, int16, int32 when compressed
        labels = np.where(rng.random(L) < 0.3, -100, ids).astype(np.int32)
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.fixture
def qa3(tmp_path):
    """40 records over 3 shards, several pages each (page_size 32 KiB, 500-token records)."""
    rng = np.random.default_rng(1)
    records = [{"input_ids": rng.integers(-2**31, 2**31 - 1, 500).astype(np.int32),
                "labels": rng.integers(-100, 32000, 500).astype(np.int32)} for _ in range(40)]
    return write_mindrecord(str(tmp_path / "qa.mindrecord"), records, QA_SCHEMA, 3), records


def _rows(path, columns=None):
    return [r.fields for r in open_mindrecord(path).rows(columns)]


def test_header_parse(qa3):
    shards, _ = qa3
    header = read_header(shards[1])
    assert header["shard_addresses"] == ["qa.mindrecord0", "qa.mindrecord1", "qa.mindrecord2"]
    assert header["schema"][0]["schema"] == QA_SCHEMA and header["schema"][0]["blob_fields"] == ["input_ids", "labels"]
    assert sum(p["page_type"] == "BLOB_DATA" for p in header["page"]) > 1  # rows span several pages


@pytest.mark.parametrize("shard", [0, 2])
def test_any_shard_reads_the_whole_set_in_order(qa3, shard):
    """MindSpore's MindDataset(one shard): the header's shard list, shard 0 first."""
    shards, records = qa3
    mr = open_mindrecord(shards[shard])
    assert [s.path for s in mr.shards] == shards and mr.compressed
    rows = _rows(shards[shard])
    assert len(rows) == 40
    for got, want in zip(rows, records):
        assert got["input_ids"].dtype == np.int32 and np.array_equal(got["input_ids"], want["input_ids"])
        assert np.array_equal(got["labels"], want["labels"])


def test_directory_reads_its_shards_sorted(tmp_path):
    """MindFormers: every *mindrecord<digits> under the directory, sorted (so ...10 before ...2)."""
    records = qa_records(12)
    os.makedirs(tmp_path / "d")
    write_mindrecord(str(tmp_path / "d" / "x.mindrecord"), records, QA_SCHEMA, 12)
    mr = open_mindrecord(str(tmp_path / "d"))
    names = [os.path.basename(s.path) for s in mr.shards]
    assert names == sorted(f"x.mindrecord{i}" for i in range(12)) and names[2] == "x.mindrecord10"
    order = [int(n[len("x.mindrecord"):]) for n in names]
    got = [r["input_ids"][0] for r in _rows(str(tmp_path / "d"), ["input_ids"])]
    assert got == order  # record i is alone in shard i


def test_every_field_type_and_the_uncompressed_version(tmp_path):
    records = [{"input_ids": np.arange(i, i + 7, dtype=np.int32) * 100000, "labels": np.array([2**40, -5, i]),
                "f": np.arange(6, dtype=np.float32).reshape(2, 3) * i, "n": -1000 * i, "s": f"rec{i}", "x": i / 3,
                "b": bytes([i, 1, 2])} for i in range(5)]
    (path,) = write_mindrecord(str(tmp_path / "m.mindrecord"), records, MIXED)
    for got, want in zip(_rows(path), records):
        assert got["labels"].dtype == np.int64 and got["f"].shape == (2, 3) and got["f"].dtype == np.float32
        for k in ("input_ids", "labels", "f"):
            assert np.array_equal(got[k], want[k])
        assert (got["n"], got["s"], got["x"], got["b"]) == (want["n"], want["s"], want["x"], want["b"])
        assert got["n"].dtype == np.int32
    (old,) = write_mindrecord(str(tmp_path / "old.mindrecord"), qa_records(3), QA_SCHEMA, version="2.0")
    assert not open_mindrecord(old).compressed
    assert [r["labels"].tolist() for r in _rows(old)] == [r["labels"].tolist() for r in qa_records(3)]


def test_integer_compression_round_trip():
    edges = [0, 127, -128, 128, -129, 32767, -32768, 32768, -32769, 2**31 - 1, -2**31, 2**31, -2**31 - 1,
             2**63 - 1, -2**63, 5]
    data = compress_int(np.array(edges))
    assert data[:4] == len(edges).to_bytes(4, "big")
    assert uncompress_int(memoryview(data)).tolist() == edges
    assert uncompress_int(memoryview(compress_int(np.array([], np.int64)))).tolist() == []
    with pytest.raises(ValueError, match="compressed integers take"):
        uncompress_int(memoryview(data[:-1]))


def test_msgpack_scalars():
    value = {"a": 1, "b": -1, "c": -1000, "d": 2**40, "e": 0.25, "s": "x" * 40, "t": ""}
    assert unpack_msgpack(pack(value)) == value
    assert unpack_msgpack(b"\x93\xc0\xc2\xc3") == [None, False, True]
    assert unpack_msgpack(b"\xcd\x01\x00") == 256 and unpack_msgpack(b"\xc4\x02ab") == b"ab"
    with pytest.raises(ValueError, match="not one MindSpore writes"):
        unpack_msgpack(b"\xd4\x00\x00")


@pytest.mark.parametrize("content, what", [
    (b"hello\n", "a text file"), (b"", "empty"), (b"\x80\x04K\x01.", "a Python pickle"),
    (b'[{"instruction": "x"}]', "JSON text"), (b"PK\x03\x04rest", "a zip archive"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1, \"b\": 22}", "damaged: its header claims 16 bytes"),
])
def test_foreign_file_is_named_with_what_it_is(tmp_path, content, what):
    path = tmp_path / "data.bin"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        open_mindrecord(str(path))
    assert f"{path} is not a MindRecord file: it is {what}" in str(e.value)
    assert "does not exist" not in str(e.value)


def test_index_db_and_encrypted_files_are_named(qa3, tmp_path):
    shards, _ = qa3
    with pytest.raises(DataError, match=r"qa\.mindrecord0\.db is not a MindRecord file: it is a SQLite database"):
        open_mindrecord(shards[0] + ".db")
    enc = tmp_path / "enc.mindrecord"
    enc.write_bytes(b"\x00\x00\x01\x00" + os.urandom(64) + b"\x00\x00\x00\x00AES-GCMENCRYPT")
    with pytest.raises(DataError, match="is an encrypted MindRecord file"):
        open_mindrecord(str(enc))


def _rewrite_header(path, change):
    header = read_header(path)
    change(header)
    text = json.dumps(header).encode()
    with open(path, "r+b") as f:
        f.write(len(text).to_bytes(8, "little") + text)  # the header region (16 KiB here) has room


@pytest.mark.parametrize("change, why", [
    (lambda h: h["schema"][0]["schema"]["labels"].update(type="int16"), "field 'labels' has type"),
    (lambda h: h["page"][0].pop("page_type_id"), "its page list lacks one of"),
    (lambda h: h["schema"].append(h["schema"][0]), "exactly one schema"),
    (lambda h: h.update(page_size="32768"), "page_size='32768'"),
])
def test_damaged_header_is_named(tmp_path, change, why):
    (path,) = write_mindrecord(str(tmp_path / "h.mindrecord"), qa_records(2), QA_SCHEMA)
    _rewrite_header(path, change)
    with pytest.raises(DataError, match=rf"h\.mindrecord: the MindRecord header is damaged \(.*{re.escape(why)}"):
        open_mindrecord(path)


def test_missing_shard_is_named(qa3):
    shards, _ = qa3
    os.remove(shards[1])
    for given in (shards[0], os.path.dirname(shards[0])):
        with pytest.raises(DataError, match=rf"{shards[1]} is missing"):
            open_mindrecord(given)


def test_missing_or_mismatched_index_is_named(qa3, tmp_path):
    shards, _ = qa3
    os.remove(shards[2] + ".db")
    with pytest.raises(DataError, match=rf"{shards[2]}\.db is missing: it is the index of the MindRecord shard"):
        _rows(shards[0])
    (one,) = write_mindrecord(str(tmp_path / "one.mindrecord"), qa_records(2), QA_SCHEMA)
    os.rename(one, tmp_path / "two.mindrecord")  # a header of a one-shard set names the file: rename both
    os.rename(one + ".db", tmp_path / "two.mindrecord.db")
    with pytest.raises(DataError, match="one.mindrecord is missing"):
        open_mindrecord(str(tmp_path / "two.mindrecord"))


def test_truncated_shard_names_the_row(tmp_path):
    (path,) = write_mindrecord(str(tmp_path / "t.mindrecord"), qa_records(4), QA_SCHEMA)
    with open(path, "r+b") as f:
        f.truncate(read_header(path)["header_size"] + 100)  # inside the first (blob) page
    with pytest.raises(DataError, match=r"t\.mindrecord: row 0 cannot be read .*truncated"):
        _rows(path)


def test_conversion_errors_name_the_record(tmp_path):
    (nothing,) = write_mindrecord(str(tmp_path / "a.mindrecord"), [{"tokens": np.arange(3, dtype=np.int32)}],
                                  {"tokens": {"type": "int32", "shape": [-1]}})
    with pytest.raises(DataError, match=r"have no 'input_ids' \(their fields: \['tokens'\]\)"):
        cached_mindrecord(nothing, str(tmp_path / "cache"))
    records = qa_records(5)
    records[3] = {"input_ids": np.arange(L + 1, dtype=np.int32), "labels": np.arange(L + 1, dtype=np.int32)}
    (ragged,) = write_mindrecord(str(tmp_path / "b.mindrecord"), records, QA_SCHEMA)
    with pytest.raises(DataError, match=r"b\.mindrecord: record 3 has 10 input_ids, the first record .* 9"):
        cached_mindrecord(ragged, str(tmp_path / "cache"))
    records[3] = {"input_ids": np.arange(L, dtype=np.int32), "labels": np.arange(L - 1, dtype=np.int32)}
    (labels,) = write_mindrecord(str(tmp_path / "c.mindrecord"), records, QA_SCHEMA)
    with pytest.raises(DataError, match=r"c\.mindrecord: record 3 has 9 input_ids but 8 labels"):
        cached_mindrecord(labels, str(tmp_path / "cache"))
    assert not os.path.exists(tmp_path / "cache") or not any(
        n.startswith(("b.", "c.")) for n in os.listdir(tmp_path / "cache"))  # nothing half-written is kept


def _batches(path, **kw):
    data = TrainData(path, micro_batch_size=2, grad_accum=2, seed=3, **kw)
    return [mb for step in data.epoch(1) for mb in step]


@pytest.mark.parametrize("schema", ["qa", "wiki"])
def test_converted_set_is_its_dataset_directory_twin(tmp_path, schema, caplog):
    """The cache reads exactly as a dataset directory with the same records (wiki: input_ids only,
    labelled by the loader as mftune's own wiki data is)."""
    records = qa_records(13)
    if schema == "wiki":
        records = [{"input_ids": r["input_ids"]} for r in records]
    shards = write_mindrecord(str(tmp_path / f"{schema}.mindrecord"), records, QA_SCHEMA if schema == "qa"
                              else WIKI_SCHEMA, 3)
    twin = str(tmp_path / "twin")
    datasets.Dataset.from_dict({k: [r[k].tolist() for r in records] for k in records[0]}).save_to_disk(twin)
    with caplog.at_level(logging.INFO, logger="mftune"):
        converted = cached_mindrecord(shards[1], str(tmp_path / "cache"))
    assert converted.records == 13 and "13 records read from 3 shard file(s)" in caplog.text
    assert datasets.load_from_disk(converted.path).column_names == list(records[0])
    for got, want in zip(_batches(converted.path), _batches(twin)):
        assert got.keys() == want.keys() == {"input_ids", "labels"}
        assert all(torch.equal(got[k], want[k]) for k in got)
    if schema == "wiki":
        assert torch.equal(_batches(converted.path)[0]["labels"], _batches(converted.path)[0]["input_ids"])


def test_cache_is_reused_and_follows_changes(tmp_path, caplog):
    shards = write_mindrecord(str(tmp_path / "qa.mindrecord"), qa_records(6), QA_SCHEMA, 2)
    cache = str(tmp_path / "cache")
    first = cached_mindrecord(shards[0], cache)
    with caplog.at_level(logging.INFO, logger="mftune"):
        again = cached_mindrecord(shards[1], cache)  # the same set through its other shard
    assert again == first and "using the converted cache" in caplog.text
    os.utime(shards[1], ns=(1, 1))
    changed = cached_mindrecord(shards[0], cache)
    assert changed.path != first.path and sorted(os.listdir(cache)) == sorted(
        os.path.basename(p) for p in (first.path, changed.path))


def _cfg(tmp_path, dataset_dir, **loader):
    cfg = MFConfig()
    cfg.output_dir = str(tmp_path / "out")
    cfg.runner_config.batch_size = 2
    cfg.train_dataset.data_loader.dataset_dir = dataset_dir
    for k, v in loader.items():
        setattr(cfg.train_dataset.data_loader, k, v)
    return cfg


def test_open_dataset_reads_a_mindrecord_set(tmp_path, caplog):
    os.makedirs(tmp_path / "d")
    shards = write_mindrecord(str(tmp_path / "d" / "qa.mindrecord"), qa_records(7), QA_SCHEMA, 3)
    model = LlamaConfig(seq_length=L - 1, vocab_size=1 << 21, hidden_size=16, num_layers=1, num_heads=2)
    for given in (shards[2], str(tmp_path / "d")):
        with caplog.at_level(logging.INFO, logger="mftune"):
            data = open_dataset(_cfg(tmp_path, given, num_samples=5), model, dp_rank=0, dp_size=1)
        assert data.num_records == 5 and data.record_length == L
        assert f"MindRecord {given}: 7 records read, 5 used (num_samples=5)" in caplog.text
    with pytest.raises(DataError, match="packing=True packs raw data files"):
        open_dataset(_cfg(tmp_path, shards[0], packing=True), model, dp_rank=0, dp_size=1)


def test_a_dataset_directory_named_mindrecord_stays_a_dataset_directory(tmp_path):
    twin = tmp_path / "alpaca4096.mindrecord"  # mftune's llama_preprocess.py keeps MindFormers' names
    datasets.Dataset.from_dict({"input_ids": [[1] * L] * 2}).save_to_disk(str(twin))
    os.makedirs(tmp_path / "sets")
    write_mindrecord(str(tmp_path / "sets" / "x.mindrecord"), qa_records(2), QA_SCHEMA)
    assert not is_mindrecord_dir(str(twin)) and is_mindrecord_dir(str(tmp_path / "sets"))
    assert not is_mindrecord_dir(str(tmp_path / "sets" / "x.mindrecord"))  # a file


def test_open_dataset_names_a_foreign_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")
    model = LlamaConfig(seq_length=8, vocab_size=100, hidden_size=16, num_layers=1, num_heads=2)
    with pytest.raises(DataError) as e:
        open_dataset(_cfg(tmp_path, str(path)), model, dp_rank=0, dp_size=1)
    assert str(e.value).startswith(f"train_dataset.data_loader.dataset_dir={path}: {path} is not a MindRecord file")
    assert "does not exist" not in str(e.value)
