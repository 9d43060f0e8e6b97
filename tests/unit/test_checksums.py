"""Checksums of tensor bytes (issue 14, item 3): every writer records them, every read path checks them, a
mismatch names file, tensor and bytes; foreign files without them load as before; a base is identified by
content (``fingerprint``), and fingerprints recorded the old way still compare.

Expected values come from the files themselves: a byte is flipped at a known offset of a tensor's data
(read from the header here), and the error must name a byte range of that tensor that holds it. The
resumed run over a changed base, as a user runs it: tests/e2e/test_checksum_runs.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import pytest
import torch
import xxhash
from safetensors.torch import load_file, save_file

from mftune.checkpoint import checksum
from mftune.checkpoint.checksum import CHUNK, KEY, owner_column
from mftune.checkpoint.convert import convert_hf_to_mftune, convert_mftune_to_hf
from mftune.checkpoint.formats import open_checkpoint
from mftune.checkpoint.formats.single_file import save_complete
from mftune.checkpoint.load import fingerprint, load_recorded_base, unique_state_dict
from mftune.checkpoint.merge import merge_lora_checkpoint
from mftune.checkpoint.safetensors_io import (file_checksums, read_block, read_metadata, read_tensor,
                                              safetensors_header, save_safetensors, write_safetensors_streaming)
from mftune.checkpoint.transform import read_strategy, transform
from mftune.errors import CheckpointError
from mftune.trainer.resume import damage

import lora_checkpoint
import tiny_checkpoints
from tiny_hf import hf_model

MATRIX = torch.arange(1024 * 700, dtype=torch.float32).reshape(1024, 700)  # 2.73 chunks, 2800-byte rows
CUBE = torch.randn(4, 300, 1000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # 2.29 chunks


def flip(path: str, name: str, at: int | None = None) -> int:
    """Flip one bit of byte ``at`` (default: the middle) of tensor ``name``'s data; returns ``at``. The
    header is untouched; the file's mtime is moved on so that per-version caches see a new version."""
    start, header, _ = safetensors_header(path)
    lo, hi = header[name]["data_offsets"]
    at = (hi - lo) // 2 if at is None else at
    with open(path, "r+b") as f:
        f.seek(start + lo + at)
        byte = f.read(1)[0]
        f.seek(start + lo + at)
        f.write(bytes([byte ^ 0x10]))
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    return at


def assert_named(exc: pytest.ExceptionInfo, path: str, name: str, at: int) -> None:
    """The error names the file, the tensor, and a byte range of its data holding byte ``at``."""
    msg = str(exc.value)
    assert f"checkpoint {path}: tensor {name} bytes [" in msg and "do not match the checksum" in msg, msg
    lo, hi, chunk, offset = map(int, re.search(r"bytes \[(\d+), (\d+)\) \(chunk (\d+), file offset (\d+)\)",
                                               msg).groups())
    assert lo <= at < hi and chunk == at // CHUNK and hi - lo <= CHUNK, msg
    assert offset == safetensors_header(path)[0] + safetensors_header(path)[1][name]["data_offsets"][0] + lo
    assert "Re-copy it or resume from an earlier checkpoint" in msg


def largest(path: str) -> str:
    header = safetensors_header(path)[1]
    return max(header, key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])


def read_all(path: str) -> None:
    for entry in open_checkpoint(path).values():
        entry.full()


# ---------------------------------------------------------------------------------------------- writers

def _save_complete(tmp_path):
    path = tiny_checkpoints.training_file(tmp_path)[0]
    return path, path


def _convert(tmp_path):
    hf_model().save_pretrained(tmp_path / "hf")
    path = str(tmp_path / "converted.safetensors")
    convert_hf_to_mftune(str(tmp_path / "hf"), path)
    return path, path


def _transform(tmp_path):
    path, _, model = tiny_checkpoints.training_file(tmp_path)
    rows = read_strategy(tiny_checkpoints.write_strategy(tmp_path / "s", model, 2, 0))
    files = transform(path, str(tmp_path / "out"), rows, range(2))
    return files[1], str(tmp_path / "out" / "train")  # the distributed folder reads rank 1's file


def _merge(tmp_path):
    ckpt = lora_checkpoint.build(tmp_path)
    path = merge_lora_checkpoint(ckpt.lora_path, str(tmp_path / "merged"))["output"]
    return path, path


def _export_hf(tmp_path):
    path = str(tmp_path / "plain.safetensors")
    save_complete(path, unique_state_dict(tiny_checkpoints.tiny_model()), model_config=tiny_checkpoints.CFG)
    convert_mftune_to_hf(path, str(tmp_path / "hf_out"), max_shard_size=20_000)
    shard = sorted(f for f in os.listdir(tmp_path / "hf_out") if f.endswith(".safetensors"))[1]
    return str(tmp_path / "hf_out" / shard), str(tmp_path / "hf_out")


@pytest.mark.parametrize("write", [_save_complete, _convert, _transform, _merge, _export_hf],
                         ids=["save_complete", "convert", "transform", "merge", "export_hf"])
def test_every_writer_records_checksums_and_a_flipped_byte_is_named(tmp_path, write):
    damaged, loaded = write(tmp_path)
    header = safetensors_header(damaged)[1]
    _, sums = file_checksums(damaged)
    assert sums.keys() == header.keys() and KEY not in read_metadata(damaged)
    for name, info in header.items():  # what a reader computes from the bytes on disk
        assert sums[name] == checksum.hash_chunks(memoryview(read_tensor(damaged, name).view(-1).view(
            torch.uint8).numpy())), name
    read_all(loaded)
    name = largest(damaged)
    at = flip(damaged, name)
    with pytest.raises(CheckpointError) as exc:
        read_all(loaded)
    assert_named(exc, damaged, name, at)


def test_the_two_writers_record_the_same_compact_checksums(tmp_path):
    tensors = {"m": MATRIX, "c": CUBE, "s": torch.tensor(7), "e": torch.zeros(0, 3), "b": torch.ones(5, dtype=torch.bool)}
    save_safetensors(tensors, str(tmp_path / "a.safetensors"), {"format": "pt"})
    write_safetensors_streaming(str(tmp_path / "b.safetensors"), [(k, v.dtype, tuple(v.shape)) for k, v in
                                                                  tensors.items()], iter(tensors.items()))
    a, b = (file_checksums(str(tmp_path / f"{x}.safetensors")) for x in "ab")
    assert a == b and a[0] == CHUNK
    assert {k: len(v) for k, v in a[1].items()} == {"m": 48, "c": 48, "s": 16, "e": 0, "b": 16}  # 16 hex / MiB
    first = bytes(MATRIX.view(-1).view(torch.uint8).numpy()[:CHUNK])
    assert a[1]["m"][:16] == f"{xxhash.xxh3_64_intdigest(first):016x}"
    for x in "ab":  # safetensors itself reads both
        got = load_file(str(tmp_path / f"{x}.safetensors"))
        assert all(torch.equal(got[k], v) for k, v in tensors.items())


# ---------------------------------------------------------------------------------------------- read paths

@pytest.fixture()
def damaged(tmp_path):
    """A file of MATRIX and CUBE with checksums, and a flip in the middle of MATRIX's chunk 1."""
    path = str(tmp_path / "t.safetensors")
    save_safetensors({"m": MATRIX, "c": CUBE, "s": torch.tensor(3)}, path, {})
    for block in [(slice(0, 1024), slice(0, 700)), (slice(3, 999), slice(None)), (slice(10, 900), slice(13, 400))]:
        assert torch.equal(read_block(path, "m", block), MATRIX[block])  # intact: every path reads it
    block = (slice(1, 4), slice(7, 299), slice(100, 900))
    assert torch.equal(read_block(path, "c", block), CUBE[block])
    return path, flip(path, "m", CHUNK + CHUNK // 2)


def test_whole_tensor_and_row_blocks(damaged):
    path, at = damaged
    row = 700 * 4
    with pytest.raises(CheckpointError) as exc:
        read_tensor(path, "m")
    assert_named(exc, path, "m", at)
    with pytest.raises(CheckpointError) as exc:  # the row holding the byte
        read_block(path, "m", (slice(at // row, at // row + 1), slice(None)))
    assert_named(exc, path, "m", at)
    assert torch.equal(read_block(path, "m", (slice(0, CHUNK // row), slice(None))), MATRIX[:CHUNK // row])
    out = torch.empty(900 - 760, 700)
    read_block(path, "m", (slice(760, 900), slice(None)), out)  # rows wholly in chunk 2, into ``out``
    assert torch.equal(out, MATRIX[760:900])


def test_an_edge_chunk_of_a_row_block_is_checked(damaged):
    """Rows [400, 500) hold bytes [1120000, 1400000): the flip (1572864) is outside them but in their chunk 1,
    whose other bytes are read to check it; rows [600, 700) are in chunk 1 too, on the flip's other side;
    rows [374, 376) straddle chunks 0 and 1."""
    path, at = damaged
    for rows in [(400, 500), (600, 700), (374, 376)]:
        assert not rows[0] * 2800 <= at < rows[1] * 2800
        with pytest.raises(CheckpointError) as exc:
            read_block(path, "m", (slice(*rows), slice(None)))
        assert_named(exc, path, "m", at)


@pytest.mark.parametrize("bounds", [[0, 350, 700], [0, 88, 176, 264, 352, 440, 528, 616, 700], [0, 233, 466, 700]])
def test_column_blocks_check_each_chunk_once_across_the_readers(damaged, bounds):
    """Tensor parallel (row-parallel weights): each rank reads a column block of every row; the damaged chunk
    is reported by exactly one of the readers of a partition of the columns, whatever the split."""
    path, at = damaged
    owner, column = owner_column(at // CHUNK, 700), at // 4 % 700
    failed = []
    for c0, c1 in zip(bounds, bounds[1:]):
        block = (slice(0, 1024), slice(c0, c1))
        try:  # a reader that does not own the chunk takes its bytes unchecked: its owner's error ends the job
            got = read_block(path, "m", block)
            assert torch.equal(got, MATRIX[block]) != (c0 <= column < c1)
        except CheckpointError as exc:
            assert_named(pytest.ExceptionInfo.from_exc_info((type(exc), exc, exc.__traceback__)), path, "m", at)
            failed.append((c0, c1))
    assert len(failed) == 1 and failed[0][0] <= owner < failed[0][1]
    counts = [sum(c0 <= owner_column(i, 700) < c1 for i in range(3)) for c0, c1 in zip(bounds, bounds[1:])]
    assert sum(counts) == 3  # the tensor's 3 chunks: each checked by exactly one reader


def test_3d_blocks_and_scalars(damaged):
    path, _ = damaged
    at = flip(path, "c", 2 * CHUNK + 1000)  # in the last, partial chunk
    with pytest.raises(CheckpointError) as exc:
        read_block(path, "c", (slice(3, 4), slice(0, 300), slice(0, 10)))
    assert_named(exc, path, "c", at)
    block = (slice(0, 1), slice(0, 300), slice(0, 10))  # chunk 0 only: intact
    assert torch.equal(read_block(path, "c", block), CUBE[block])
    assert int(read_tensor(path, "s")) == 3
    at = flip(path, "s", 0)
    with pytest.raises(CheckpointError) as exc:
        read_tensor(path, "s")
    assert_named(exc, path, "s", at)


def test_verification_can_be_turned_off(damaged, monkeypatch):
    path, at = damaged
    monkeypatch.setenv("MFTUNE_VERIFY_CHECKSUMS", "0")
    got = read_tensor(path, "m")
    assert not torch.equal(got, MATRIX) and torch.equal(got.view(-1)[:at // 4], MATRIX.view(-1)[:at // 4])


def test_foreign_file_without_checksums_loads_as_before(tmp_path):
    path = str(tmp_path / "foreign.safetensors")
    save_file({"m": MATRIX}, path, metadata={"format": "pt"})
    assert file_checksums(path) == (0, {})
    flip(path, "m")  # nothing to check it against: read as it is, as before
    block = (slice(0, 1024), slice(100, 200))
    assert torch.equal(read_block(path, "m", block)[:1], MATRIX[block][:1])


def test_a_damaged_checksum_record_is_named(tmp_path, monkeypatch):
    path = str(tmp_path / "bad.safetensors")
    save_file({"m": MATRIX}, path, metadata={KEY: json.dumps({"algorithm": "xxh3_64", "chunk": CHUNK,
                                                              "tensors": {"m": "00"}})})
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: its header's checksum record .* tensor m: 2 hex "
                                              f"digits for 2867200 bytes.*MFTUNE_VERIFY_CHECKSUMS=0"):
        read_tensor(path, "m")
    monkeypatch.setenv("MFTUNE_VERIFY_CHECKSUMS", "0")
    assert torch.equal(read_tensor(path, "m"), MATRIX)


# ---------------------------------------------------------------------------------------------- fingerprints

def test_fingerprint_is_content(tmp_path, monkeypatch):
    """A Hugging Face file (no checksums): its bytes are hashed, once per version. A file with checksums: its
    size and header (the hashes of its bytes)."""
    hf = tmp_path / "hf"
    hf_model().save_pretrained(hf)
    weights = str(hf / "model.safetensors")
    calls = []
    monkeypatch.setattr("mftune.checkpoint.load.content_hash", lambda p: calls.append(p) or checksum.content_hash(p))
    before, file_before = fingerprint(str(hf)), fingerprint(weights)
    assert before.startswith("c1:") and len(before) == 35 and fingerprint(str(hf)) == before
    assert calls == [str(hf / "config.json"), weights]  # each file once, then cached
    (hf / "tokenizer_config.json").write_text("{}")  # not the model: no change
    (hf / "pytorch_model.bin").write_bytes(b"not read: the safetensors file is")
    assert fingerprint(str(hf)) == before
    flip(weights, "model.layers.0.mlp.down_proj.weight")  # same size, same header
    assert fingerprint(str(hf)) != before and fingerprint(weights) != file_before

    ours = tiny_checkpoints.training_file(tmp_path)[0]
    start, header = safetensors_header(ours)[:2]
    with open(ours, "rb") as f:
        raw = f.read(start)[8:]
    assert fingerprint(ours) == "c1:" + xxhash.xxh3_128_hexdigest(b"header:%d:" % os.path.getsize(ours) + raw)


def test_old_fingerprints_still_compare(tmp_path):
    """Checkpoints written before content fingerprints recorded sha256(size + header)[:16]: a resumed run over
    the same base still resumes; over another base it is still refused."""
    path, tensors, _ = tiny_checkpoints.training_file(tmp_path)
    with open(path, "rb") as f:
        f.read(8)
        raw = f.read(safetensors_header(path)[0] - 8)
    old = hashlib.sha256(str(os.path.getsize(path)).encode() + raw).hexdigest()[:16]
    assert fingerprint(path, like=old) == old and fingerprint(path) != old
    model = tiny_checkpoints.tiny_model(lora=True)
    found = load_recorded_base(model, {"path": path, "fingerprint": old}, "the resume checkpoint")
    assert found["fingerprint"] == old
    with pytest.raises(CheckpointError, match="holds other contents"):
        load_recorded_base(model, {"path": path, "fingerprint": "0123456789abcdef"}, "the resume checkpoint")


def test_a_changed_foreign_base_is_refused_naming_it(tmp_path):
    path = str(tmp_path / "base.safetensors")
    model = tiny_checkpoints.tiny_model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata={"format": "pt"})
    recorded = {"path": path, "fingerprint": fingerprint(path)}
    flip(path, "model.tok_embeddings.embedding_weight")
    with pytest.raises(CheckpointError, match=f"trained over the base {path} .* and {path} holds other contents"):
        load_recorded_base(model, recorded, "ckpt")


def test_resume_treats_a_checksum_mismatch_as_damage(tmp_path):
    path = tiny_checkpoints.training_file(tmp_path)[0]
    assert damage(path) is None
    at = flip(path, "adam_m.model.layers.1.attention.wv.mindpet_delta_lora_b")
    why = damage(path)
    assert why.startswith("tensor adam_m.model.layers.1.attention.wv.mindpet_delta_lora_b bytes [0, ") and why.endswith(
        "do not match the checksum written with it: damaged") and at < CHUNK
