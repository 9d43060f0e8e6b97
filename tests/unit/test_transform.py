"""Checkpoint transformation (auto_trans_ckpt's engine; scripts/transform_checkpoint.py is
tests/e2e/test_transform_script.py).

The destination layouts here are strategy files written by the test (each rank's block computed
with torch.chunk, as DTensor shards: tests/transform_checkpoints.py), so the expected bytes of every
rank file are known without mftune; the trainer-written strategies are exercised by
tests/distributed/test_parallel.py and test_resume.py."""
import json
import os

import pytest
import torch

from mftune.checkpoint.load import load_checkpoint
from mftune.checkpoint.safetensors_io import load_tensors, read_metadata
from mftune.errors import CheckpointError
from mftune.checkpoint.transform import (check_source_strategy, read_strategy, refuse_overlap, transform,
                                         worker_ranks)
from mftune.models.llama import LlamaForCausalLM
from mftune.pet import get_pet_model

import tiny_checkpoints
from tiny_checkpoints import CFG, COUNTERS, LORA, write_strategy


@pytest.fixture()
def training_file(tmp_path):
    return tiny_checkpoints.training_file(tmp_path)


def test_complete_to_two_layouts_and_back_is_bitwise(tmp_path, training_file):
    path, tensors, model = training_file
    rows = read_strategy(write_strategy(tmp_path / "s2", model, 2, 0))
    cols = read_strategy(write_strategy(tmp_path / "s3", model, 3, -1))
    out = tmp_path / "out"
    files = transform(path, str(out / "a"), rows, range(2))
    assert files == [str(out / "a" / "train" / f"rank_{r}" / f"checkpoint_{r}.safetensors") for r in range(2)]
    wq = "model.layers.0.attention.wq.weight"
    for r, file in enumerate(files):
        got = load_tensors(file)
        for name in (wq, "adam_m.model.layers.1.attention.wv.mindpet_delta_lora_b"):
            block = tuple(slice(*b) for b in rows[r]["tensors"][name.removeprefix("adam_m.")]["block"])
            assert torch.equal(got[name], tensors[name][block]), (r, name)
        assert all(torch.equal(got[k], tensors[k]) for k in COUNTERS)  # counters: every file
        assert "rng_state" not in got  # belongs to the saving layout
        assert ("extra.table" in got) == (r == 0)  # not a parameter: once
        meta = read_metadata(file)
        assert meta["pet_config"] == LORA and meta["base_checkpoint"]["path"] == "/b"
        assert meta["shards"]["rank"] == r and wq in meta["shards"]["tensors"]
        with open(os.path.join(os.path.dirname(file), "meta.json")) as f:
            assert json.load(f)["file_size"] == os.path.getsize(file)
    # 2 ranks by rows -> 3 ranks by columns -> one complete file: the original bytes
    files = transform(str(out / "a" / "train"), str(out / "b"), cols, range(3))
    assert len(files) == 3 and load_tensors(files[2])[wq].shape == (32, 10)  # 11 + 11 + 10 columns
    (final,) = transform(str(out / "b" / "train"), str(out / "c"), None, [0])
    got = load_tensors(final)
    assert set(got) == set(tensors) - {"rng_state"}
    for name, value in got.items():
        assert value.dtype == tensors[name].dtype and torch.equal(value, tensors[name]), name
    assert "shards" not in read_metadata(final)  # complete: loadable as a file
    fresh = LlamaForCausalLM(dict(CFG))
    get_pet_model(fresh, dict(LORA))
    load_checkpoint(fresh, str(out / "b" / "train"))  # the 3-rank folder loads as one checkpoint
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_mismatched_strategies_are_errors(tmp_path, training_file):
    path, _, model = training_file
    strategy_dir = write_strategy(tmp_path / "s", model, 2, 0)
    record = read_strategy(strategy_dir)
    record[1]["tensors"]["model.norm_out.weight"]["global_shape"] = [48]
    with pytest.raises(CheckpointError, match=r"model.norm_out.weight has shape \[32\].*\[48\].*another model_config"):
        transform(path, str(tmp_path / "out"), record, [1])
    os.remove(os.path.join(strategy_dir, "ckpt_strategy_rank_1.json"))
    with pytest.raises(CheckpointError, match="lacks ckpt_strategy_rank_1.json of a 2-rank layout"):
        read_strategy(strategy_dir)
    write_strategy(tmp_path / "s", model, 3, 0)  # a 3-rank layout partly overwritten by a 2-rank one
    write_strategy(tmp_path / "s", model, 2, 0)
    with pytest.raises(CheckpointError, match="mixes layouts: ckpt_strategy_rank_0.json records world_size 2, expected 3"):
        read_strategy(strategy_dir, 3)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_strategy(str(tmp_path / "none"))
    # a source strategy is checked against the rank files' own records
    files = transform(path, str(tmp_path / "rows"), read_strategy(strategy_dir), range(2))
    check_source_strategy(strategy_dir, files)
    other = write_strategy(tmp_path / "cols", model, 2, -1)
    with pytest.raises(CheckpointError, match="does not describe checkpoint .*rank_0"):
        check_source_strategy(other, files)


def test_source_and_destination_never_overlap(tmp_path):
    src = tmp_path / "out" / "transformed_checkpoint" / "ckpt"
    src.mkdir(parents=True)
    for dst in (src, src / "inner", tmp_path / "out"):
        with pytest.raises(CheckpointError, match="source would be overwritten"):
            refuse_overlap(str(src), str(dst))
    refuse_overlap(str(src), str(tmp_path / "elsewhere" / "ckpt"))


def test_worker_split_follows_mindformers():
    assert worker_ranks(8, 2) == {0: [0, 1, 2, 3], 4: [4, 5, 6, 7]}
    assert worker_ranks(8, 1) == {0: list(range(8))}
    assert worker_ranks(2, 4) == {0: [0], 1: [1]}  # clamped to the world size
    with pytest.raises(CheckpointError, match="transform_process_num=3 must divide the world size 8"):
        worker_ranks(8, 3)
