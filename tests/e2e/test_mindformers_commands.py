"""MindFormers' documented command names as a user runs them: scripts/transform_checkpoint.sh with its
positional arguments, run_mindformer.py and scripts/msrun_launcher.sh (the same entry point and launcher as
run_finetune.py and scripts/launcher.sh; a 2-rank job through both is in tests/distributed/test_parallel.py)."""
import os
import subprocess
import sys

import torch

import tiny_checkpoints
from mftune.checkpoint.safetensors_io import load_tensors
from tiny_checkpoints import write_strategy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sh(script: str, *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", script), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_transform_checkpoint_sh_positional_arguments(tmp_path):
    """SRC SRC_STRATEGY DST DST_STRATEGY WORLD_SIZE PROCESS_NUM [PREFIX]: two processes write a 4-rank layout
    (logs in ./log/transform_i.log, which it creates but never empties); back to complete with None."""
    path, tensors, model = tiny_checkpoints.training_file(tmp_path)
    strategy = write_strategy(tmp_path / "strategy", model, 4, 0)
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "mine.txt").write_text("kept")
    r = _sh("transform_checkpoint.sh", path, "None", "dst", strategy, "4", "2", "llama_", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "transform finished" in r.stdout and (tmp_path / "log" / "mine.txt").read_text() == "kept"
    assert "......Transform finished!......" in (tmp_path / "log" / "transform_1.log").read_text()
    ranks = tmp_path / "dst" / "train"
    assert sorted(d for d in os.listdir(ranks) if d.startswith("rank_")) == [f"rank_{i}" for i in range(4)]
    r = _sh("transform_checkpoint.sh", str(ranks), "None", "full", "None", "1", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    got = load_tensors(str(tmp_path / "full" / "train" / "rank_0" / "checkpoint_0.safetensors"))
    assert all(torch.equal(got[k], tensors[k]) for k in got) and len(got) == len(tensors) - 1  # less rng_state


def test_transform_checkpoint_sh_fails_when_a_process_fails(tmp_path):
    r = _sh("transform_checkpoint.sh", "missing.safetensors", "None", "dst", "None", "1", "1", cwd=tmp_path)
    assert r.returncode == 1 and "transform finished" not in r.stdout
    assert "transform process 0 failed; see ./log/transform_0.log" in r.stderr
    assert "does not exist" in (tmp_path / "log" / "transform_0.log").read_text()
    r = _sh("transform_checkpoint.sh", "a", "b", "c", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout.startswith("Usage:")


def test_run_mindformer_and_msrun_launcher_are_the_same_commands(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "run_mindformer.py"), "--help"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("usage: run_mindformer.py [-h] --config CONFIG")
    assert "--adapter_id" in r.stdout and "--modal_type" in r.stdout
    r = subprocess.run([sys.executable, os.path.join(ROOT, "run_mindformer.py"), "--config", "nowhere.yaml"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "--config='nowhere.yaml' is invalid" in r.stderr and "Traceback" not in r.stderr
    r = _sh("msrun_launcher.sh", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "bash scripts/msrun_launcher.sh \"EXECUTE_ORDER\" WORKER_NUM" in r.stdout
