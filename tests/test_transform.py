"""Checkpoint transformation (auto_trans_ckpt's engine and scripts/transform_checkpoint.py).

The destination layouts here are strategy files written by the test (each rank's block computed
with torch.chunk, as DTensor shards), so the expected bytes of every rank file are known without
mftune; the trainer-written strategies are exercised by tests/test_parallel.py and test_resume.py."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mftune.checkpoint.formats.single_file import save_complete
from mftune.checkpoint.load import load_checkpoint
from mftune.checkpoint.safetensors_io import load_tensors, read_metadata
from mftune.errors import CheckpointError
from mftune.checkpoint.transform import (check_source_strategy, read_strategy, refuse_overlap, transform,
                                         worker_ranks)
from mftune.models.llama import LlamaForCausalLM
from mftune.pet import get_pet_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = {"seq_length": 16, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "n_kv_heads": 2,
       "vocab_size": 64, "multiple_of": 16}
LORA = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ".*wq|.*wv"}
COUNTERS = {"epoch_num": 1, "step_num": 4, "global_step": 4, "global_batch_size": 8}


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(dict(CFG))
    get_pet_model(model, dict(LORA))
    for name, p in model.named_parameters():
        if "lora" in name:
            torch.nn.init.normal_(p)
    return model


@pytest.fixture()
def training_file(tmp_path):
    """A complete training checkpoint: weights, adapters' AdamW moments, counters, an RNG state
    and one tensor that is not a parameter."""
    model = _model()
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        if p.requires_grad:
            tensors[f"adam_m.{name}"] = torch.randn_like(p)
            tensors[f"adam_v.{name}"] = torch.rand_like(p)
    tensors.update({k: torch.tensor(v) for k, v in COUNTERS.items()})
    tensors["loss_scale"] = torch.tensor(1.0)
    tensors["rng_state"] = torch.get_rng_state()
    tensors["extra.table"] = torch.arange(12.0).reshape(3, 4)
    path = str(tmp_path / "train.safetensors")
    save_complete(path, tensors, model_config={**CFG, "pet_config": LORA},
                  extra_metadata={"pet_config": LORA, "base_checkpoint": {"path": "/b", "fingerprint": "f"}})
    return path, tensors, model


def _blocks(shape, world, dim):
    """Each rank's block when ``dim`` is split like torch.chunk (DTensor's Shard)."""
    if not shape:
        return [[] for _ in range(world)]
    n = shape[dim]
    size = -(-n // world)
    out = []
    for r in range(world):
        block = [[0, s] for s in shape]
        block[dim] = [min(r * size, n), min((r + 1) * size, n)]
        out.append(block)
    return out


def _write_strategy(directory, model, world, dim):
    os.makedirs(directory, exist_ok=True)
    params = {n: list(p.shape) for n, p in model.named_parameters()}
    for r in range(world):
        tensors = {n: {"global_shape": s, "dtype": "float32", "block": _blocks(s, world, dim % len(s))[r],
                       "placements": []} for n, s in params.items()}
        with open(os.path.join(directory, f"ckpt_strategy_rank_{r}.json"), "w") as f:
            json.dump({"rank": r, "world_size": world, "mesh": {"dp": 1, "tp": world}, "tensors": tensors}, f)
    return str(directory)


def test_complete_to_two_layouts_and_back_is_bitwise(tmp_path, training_file):
    path, tensors, model = training_file
    rows = read_strategy(_write_strategy(tmp_path / "s2", model, 2, 0))
    cols = read_strategy(_write_strategy(tmp_path / "s3", model, 3, -1))
    out = tmp_path / "out"
    files = transform(path, str(out / "a"), rows, range(2))
    assert files == [str(out / "a" / "train" / f"rank_{r}" / f"checkpoint_{r}.safetensors") for r in range(2)]
    wq = "model.layers.0.attention.wq.weight"
    for r, file in enumerate(files):
        got = load_tensors(file)
        for name in (wq, f"adam_m.model.layers.1.attention.wv.mindpet_delta_lora_b"):
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
    strategy_dir = _write_strategy(tmp_path / "s", model, 2, 0)
    record = read_strategy(strategy_dir)
    record[1]["tensors"]["model.norm_out.weight"]["global_shape"] = [48]
    with pytest.raises(CheckpointError, match=r"model.norm_out.weight has shape \[32\].*\[48\].*another model_config"):
        transform(path, str(tmp_path / "out"), record, [1])
    os.remove(os.path.join(strategy_dir, "ckpt_strategy_rank_1.json"))
    with pytest.raises(CheckpointError, match="lacks ckpt_strategy_rank_1.json of a 2-rank layout"):
        read_strategy(strategy_dir)
    _write_strategy(tmp_path / "s", model, 3, 0)  # a 3-rank layout partly overwritten by a 2-rank one
    _write_strategy(tmp_path / "s", model, 2, 0)
    with pytest.raises(CheckpointError, match="mixes layouts: ckpt_strategy_rank_0.json records world_size 2, expected 3"):
        read_strategy(strategy_dir, 3)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_strategy(str(tmp_path / "none"))
    # a source strategy is checked against the rank files' own records
    files = transform(path, str(tmp_path / "rows"), read_strategy(strategy_dir), range(2))
    check_source_strategy(strategy_dir, files)
    other = _write_strategy(tmp_path / "cols", model, 2, -1)
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


def _script(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "transform_checkpoint.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_transform_checkpoint_script(tmp_path, training_file):
    path, tensors, model = training_file
    strategy = _write_strategy(tmp_path / "strategy", model, 4, 0)
    dst = str(tmp_path / "dst")
    # two processes of a 4-rank destination, as transform_checkpoint.sh runs them
    for rank_id in (0, 2):
        r = _script("--src_checkpoint", path, "--dst_checkpoint_dir", dst, "--dst_strategy", strategy,
                    "--transform_process_num", "2", "--rank_id", str(rank_id), "--src_strategy", "None")
        assert r.returncode == 0, r.stderr
        assert "......Transform finished!......" in r.stdout
    assert sorted(os.listdir(os.path.join(dst, "train"))) == [
        "rank_0", "rank_1", "rank_2", "rank_3", "transform_succeed_rank_0.txt", "transform_succeed_rank_2.txt"]
    # distributed -> complete (no --dst_strategy), with its source strategy checked
    r = _script("--src_checkpoint", os.path.join(dst, "train"), "--dst_checkpoint_dir", str(tmp_path / "full"),
                "--src_strategy", strategy, "--prefix", "llama_")
    assert r.returncode == 0, r.stderr
    got = load_tensors(str(tmp_path / "full" / "train" / "rank_0" / "llama_0.safetensors"))
    assert all(torch.equal(got[k], tensors[k]) for k in got) and len(got) == len(tensors) - 1
    # a 2-rank layout written over the 4-rank one: the extra rank folders go
    _write_strategy(tmp_path / "s2", model, 2, -1)
    r = _script("--src_checkpoint", path, "--dst_checkpoint_dir", dst, "--dst_strategy", str(tmp_path / "s2"))
    assert r.returncode == 0 and "Removing" in r.stderr, r.stderr
    assert sorted(d for d in os.listdir(os.path.join(dst, "train")) if d.startswith("rank_")) == ["rank_0", "rank_1"]


@pytest.mark.parametrize("args, expect", [
    (["--rank_id", "1", "--transform_process_num", "2"], "--rank_id 1 is not a transform rank"),
    (["--world_size", "8"], "--world_size 8 but the strategy"),
    (["--transform_process_num", "3"], "must divide the world size 4"),
    (["--dst_strategy", "None", "--world_size", "2"], "need --dst_strategy"),
    (["--dst_strategy", "None", "--transform_process_num", "2"], "written by one process"),
])
def test_transform_checkpoint_script_errors(tmp_path, training_file, args, expect):
    path, _, model = training_file
    strategy = _write_strategy(tmp_path / "strategy", model, 4, 0)
    r = _script("--src_checkpoint", path, "--dst_checkpoint_dir", str(tmp_path / "dst"),
                "--dst_strategy", strategy, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and expect in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "dst")


def test_transform_checkpoint_script_refuses_to_overwrite_its_source(tmp_path, training_file):
    path, _, _ = training_file
    src = tmp_path / "dst" / "train"
    transform(path, str(tmp_path / "dst"), None, [0])
    before = sorted(os.listdir(src))
    r = _script("--src_checkpoint", str(src), "--dst_checkpoint_dir", str(tmp_path / "dst"))
    assert r.returncode == 2 and "source would be overwritten" in r.stderr, r.stderr
    assert sorted(os.listdir(src)) == before
    r = _script("--src_checkpoint", str(tmp_path / "missing"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_script_refuses_a_destination_it_did_not_write(tmp_path, training_file):
    path, _, _ = training_file
    foreign = tmp_path / "dst" / "train" / "rank_0"
    foreign.mkdir(parents=True)
    (foreign / "model.safetensors").write_bytes(b"not written by a transform")
    r = _script("--src_checkpoint", path, "--dst_checkpoint_dir", str(tmp_path / "dst"))
    assert r.returncode == 2 and "is not the output of a checkpoint transform" in r.stderr, r.stderr
    assert (foreign / "model.safetensors").read_bytes() == b"not written by a transform"


def _auto_transform_rank(rank, init_file, output_dir, src, results):
    """One of two gloo ranks running auto_transform; rank 1's share of the work fails."""
    import torch.distributed as dist

    import mftune.checkpoint.transform as engine

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    if rank == 1:
        def broken(*args, **kwargs):
            raise OSError("No space left on device")
        engine.transform = broken
    try:
        engine.auto_transform(src, output_dir, rank=rank, world_size=2, process_num=2)
        results.put((rank, "ok"))
    except CheckpointError as exc:
        results.put((rank, str(exc)))
    finally:
        dist.destroy_process_group()


def test_a_failing_worker_stops_every_rank(tmp_path, training_file):
    """auto_trans_ckpt with transform_process_num 2 on 2 ranks: rank 1's transform fails; both
    ranks raise (rank 0 naming rank 1) instead of waiting, and the markers say what happened."""
    import torch.multiprocessing as mp

    path, _, model = training_file
    out = tmp_path / "out"
    _write_strategy(out / "strategy", model, 2, 0)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_auto_transform_rank, args=(r, str(tmp_path / "init"), str(out), path, results))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    got = dict(results.get(timeout=60) for _ in range(2))  # a rank that died puts nothing: Empty
    assert "No space left on device" in got[1]
    assert "the checkpoint transform failed on rank 1" in got[0]
    done = out / "transformed_checkpoint" / "train"
    assert (done / "transform_succeed_rank_0.txt").exists()
    assert "No space left on device" in (done / "transform_failed_rank_1.txt").read_text()
