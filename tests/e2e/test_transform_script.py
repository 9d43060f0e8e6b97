"""scripts/transform_checkpoint.py as a user runs it (real subprocesses, MindFormers' argument names):
two processes writing a 4-rank layout, back to complete, errors with exit status 2, and never writing over
its source or a folder it did not write. Expected values: the source's tensors, block by block."""
import os
import subprocess
import sys

import pytest
import torch

from mftune.checkpoint.safetensors_io import load_tensors
from mftune.checkpoint.transform import transform

import tiny_checkpoints
from tiny_checkpoints import write_strategy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture()
def training_file(tmp_path):
    return tiny_checkpoints.training_file(tmp_path)


def _script(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "transform_checkpoint.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_transform_checkpoint_script(tmp_path, training_file):
    path, tensors, model = training_file
    strategy = write_strategy(tmp_path / "strategy", model, 4, 0)
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
    write_strategy(tmp_path / "s2", model, 2, -1)
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
    strategy = write_strategy(tmp_path / "strategy", model, 4, 0)
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
