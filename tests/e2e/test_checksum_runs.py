"""Checksums as a user meets them (issue 14, item 3): run_finetune.py resuming over a base whose bytes changed
in the middle of a tensor is refused (exit 2, no traceback) naming the file: the tensor and bytes when the base
carries checksums (mftune wrote it), the changed contents when it carries none (a foreign file, identified by
a hash of its bytes). A newest training checkpoint with a damaged byte is skipped for the last intact one.
The in-process checks of the same rules: tests/unit/test_checksums.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import save_file

from mftune.checkpoint.safetensors_io import load_tensors, safetensors_header

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import parity as pp  # noqa: E402

CKPT = "llama_7b_lora_rank_0-1_{}.safetensors"  # parity's run saves steps 4 and 6 (its end)
EMBEDDING = "model.tok_embeddings.embedding_weight"


def run(config: str, out: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([sys.executable, "run_finetune.py", "--config", config, "--run_mode", "finetune",
                           "--use_parallel", "False", "--batch_size", str(pp.GLOBAL_BATCH), "--output_dir", out,
                           *extra], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def resume(config: str, checkpoint: str, out: str, *extra: str) -> subprocess.CompletedProcess:
    return run(config, out, "--load_checkpoint", checkpoint, "--resume_training", "True", "--epochs", "2", *extra)


def refused(r: subprocess.CompletedProcess, *named: str) -> str:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout[-2000:] + r.stderr[-3000:]
    for text in named:
        assert text in r.stderr, r.stderr[-3000:]
    return r.stderr


def flip(path: str, name: str) -> int:
    """Flip one bit in the middle of tensor ``name``'s bytes; returns the byte's offset in the tensor."""
    start, header, _ = safetensors_header(path)
    lo, hi = header[name]["data_offsets"]
    at = (hi - lo) // 2
    with open(path, "r+b") as f:
        f.seek(start + lo + at)
        byte = f.read(1)[0]
        f.seek(start + lo + at)
        f.write(bytes([byte ^ 0x10]))
    return at


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """parity's tiny model, base (written by mftune: with checksums) and data, and its uninterrupted run."""
    d = str(tmp_path_factory.mktemp("checksums"))
    config = pp.make_workdir(d)
    full = os.path.join(d, "full")
    r = run(config, full)
    assert r.returncode == 0, r.stderr[-3000:]
    return d, config, full


def test_resume_over_a_base_damaged_in_the_middle_is_refused(workdir):
    """Before: the base's fingerprint covered its size and header only, and nothing checked tensor data: the run
    resumed on the changed weights without a word."""
    d, config, full = workdir
    base = os.path.join(d, "base.safetensors")
    kept = shutil.copy(base, os.path.join(d, "base.kept"))
    try:
        at = flip(base, EMBEDDING)
        err = refused(resume(config, os.path.join(full, "checkpoint"), os.path.join(d, "over-damaged")),
                      f"checkpoint {base}: tensor {EMBEDDING} bytes [", "do not match the checksum written with it",
                      "the file is damaged")
        assert f"bytes [0, {min(2**20, 2 * at)}) (chunk 0" in err  # the tensor is < 1 MiB: one chunk
        assert not os.path.exists(os.path.join(d, "over-damaged", "metrics.jsonl"))
    finally:
        shutil.move(kept, base)


def test_resume_over_a_changed_foreign_base_is_refused(workdir):
    """A base without checksums (as a Hugging Face download is): identified by a hash of its bytes."""
    d, config, _ = workdir
    tensors = load_tensors(os.path.join(d, "base.safetensors"))
    foreign = os.path.join(d, "foreign.safetensors")
    save_file(tensors, foreign, metadata={"format": "pt", "mftune_model_config": safetensors_header(
        os.path.join(d, "base.safetensors"))[2]["mftune_model_config"]})
    first = os.path.join(d, "over-foreign")
    r = run(config, first, "--load_checkpoint", foreign)
    assert r.returncode == 0, r.stderr[-3000:]
    flip(foreign, EMBEDDING)
    refused(resume(config, os.path.join(first, "checkpoint"), os.path.join(d, "over-foreign-changed")),
            f"was trained over the base {foreign}", f"and {foreign} holds other contents", "Restore the original base")


def test_newest_checkpoint_with_a_damaged_byte_is_skipped(workdir):
    """resume_training True falls back to step 4, naming the file and the damaged tensor; the losses go on as
    in the uninterrupted run."""
    d, config, full = workdir
    ckpt = os.path.join(d, "damaged-checkpoint")
    shutil.copytree(os.path.join(full, "checkpoint"), ckpt)
    newest = os.path.join(ckpt, "rank_0", CKPT.format(6))
    name = "model.layers.0.attention.wq.mindpet_delta_lora_a"
    flip(newest, name)
    out = os.path.join(d, "fallback")
    r = resume(config, ckpt, out)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert f"skipped the damaged checkpoint(s) {newest} (tensor {name} bytes [0, " in log
    assert f"resuming from {os.path.join(ckpt, 'rank_0', CKPT.format(4))} (epoch 1, step 4)" in log
    assert pp.losses(out, "step")[0] == 5 and pp.losses(out)[0] == pp.losses(full)[4]
