"""run_finetune.py on inputs that used to pass silently or end in a traceback (issue 14): a raw alpaca file
with a malformed record, empty data, non-UTF-8 data, a resume point with nothing left to train, a damaged
newest checkpoint. Each refusal exits with status 2, names the file or key, and prints no traceback; the
in-process checks of the same rules are tests/unit/test_silent_inputs.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import datasets
import pytest
import yaml

from mftune.data.sample import load_sample_records, train_sample_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import parity as pp  # noqa: E402

CKPT = "llama_7b_lora_rank_0-1_{}.safetensors"  # parity's run saves steps 4 and 6 (its end)


def run(config: str, out: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([sys.executable, "run_finetune.py", "--config", config, "--run_mode", "finetune",
                           "--use_parallel", "False", "--batch_size", str(pp.GLOBAL_BATCH), "--output_dir", out,
                           *extra], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def refused(r: subprocess.CompletedProcess, *named: str) -> str:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout[-2000:] + r.stderr[-3000:]
    for text in named:
        assert text in r.stderr, r.stderr[-3000:]
    return r.stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """parity's tiny model, base and data, its config with the sample tokenizer as vocab_file, and the
    uninterrupted run (checkpoints at steps 4 and 6)."""
    d = str(tmp_path_factory.mktemp("silent"))
    with open(pp.make_workdir(d)) as f:
        cfg = yaml.safe_load(f)
    cfg["processor"]["tokenizer"]["vocab_file"] = train_sample_tokenizer(os.path.join(d, "tok"), 1000)
    config = os.path.join(d, "raw.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    full = os.path.join(d, "full")
    r = run(config, full)
    assert r.returncode == 0, r.stderr[-3000:]
    return d, config, full


def _alpaca(d: str, name: str, bad_index: int | None = None) -> str:
    records = load_sample_records()[:40]
    if bad_index is not None:
        records[bad_index] = {"instruction": "no answer here", "input": ""}
    path = os.path.join(d, name)
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def test_malformed_record_stops_the_run_and_is_named(workdir):
    """Before: exit 0, the log saying "Skipped 0 malformed"."""
    d, config, _ = workdir
    path = _alpaca(d, "missing_output.json", bad_index=17)
    out = os.path.join(d, "malformed")
    refused(run(config, out, "--train_dataset_dir", path), path, "1 of 40 records are malformed",
            "record 17: field 'output' is missing", "train_dataset.max_skipped_ratio=0.01")
    cache = os.path.join(out, "dataset_cache")
    assert not os.path.exists(cache) or not os.listdir(cache)  # no cache to reuse silently
    r = run(config, out, "--train_dataset_dir", path, "--train_dataset.max_skipped_ratio", "0.05")
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "Transformed 39 records. Skipped 1 malformed of 40 read" in log
    assert f"Dataset {path}: skipped 1 malformed record(s) of 40 read: record 17: field 'output' is missing" in log


@pytest.mark.parametrize("name, content, named", [
    ("empty.json", b"[]", "holds no records (an empty JSON list)"),
    ("empty.jsonl", b"", "holds no records (no JSON line)"),
    ("latin1.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n',
     "is not UTF-8 text: byte 0xe9 at byte offset {offset} (line 2)"),
    ("latin1.json", b'[{"instruction": "caf\xe9", "output": "b"}]',
     "is not UTF-8 text: byte 0xe9 at byte offset {offset} (line 1)"),
])
def test_empty_or_non_utf8_raw_file(workdir, name, content, named):
    """Before: an empty file said "no valid record ... 0 malformed"; a non-UTF-8 .jsonl ended in a traceback."""
    d, config, _ = workdir
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.write(content)
    named = named.format(offset=content.find(b"\xe9"))  # the undecodable byte's position in the file
    refused(run(config, os.path.join(d, "bad-" + name), "--train_dataset_dir", path), path, named)


def test_dataset_directory_of_0_rows(workdir):
    """Before: an IndexError traceback from datasets' load_from_disk."""
    d, config, _ = workdir
    path = os.path.join(d, "empty_ds")
    ints = datasets.Sequence(datasets.Value("int32"))
    datasets.Dataset.from_dict({"input_ids": [], "labels": []},
                               features=datasets.Features({"input_ids": ints, "labels": ints})).save_to_disk(path)
    refused(run(config, os.path.join(d, "empty-ds"), "--train_dataset_dir", path), path,
            "holds no records (a dataset of 0 rows)")


def test_resume_at_the_end_is_an_error(workdir):
    """Before: exit 0 after 0 steps."""
    d, config, full = workdir
    out = os.path.join(d, "resume-end")
    refused(run(config, out, "--load_checkpoint", os.path.join(full, "checkpoint"), "--resume_training", "True"),
            "runner_config.epochs=1 is invalid for this resume", CKPT.format(6), "epoch 1, step 6 (global step 6)",
            "Raise --epochs (e.g. --epochs 2)")
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))


def test_truncated_newest_checkpoint(workdir):
    """resume_training True falls back to step 4, saying so; naming the truncated file is an error."""
    d, config, full = workdir
    ckpt = os.path.join(d, "damaged")
    shutil.copytree(os.path.join(full, "checkpoint"), ckpt)
    newest = os.path.join(ckpt, "rank_0", CKPT.format(6))
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    out = os.path.join(d, "fallback")
    r = run(config, out, "--load_checkpoint", ckpt, "--resume_training", "True", "--epochs", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert f"skipped the damaged checkpoint(s) {newest}" in log
    assert f"resuming from {os.path.join(ckpt, 'rank_0', CKPT.format(4))} (epoch 1, step 4)" in log
    assert pp.losses(out, "step")[0] == 5 and pp.losses(out)[0] == pp.losses(full)[4]  # then epochs=2 changes the LR
    refused(run(config, os.path.join(d, "named"), "--load_checkpoint", ckpt, "--resume_training",
                CKPT.format(6)[:-len(".safetensors")], "--epochs", "2"),
            f"checkpoint {newest} cannot be resumed from", "meta.json recorded")


def test_nan_in_a_base_weight_is_blamed_on_the_checkpoint(workdir):
    """A base checkpoint with NaN inside one frozen tensor: every step is skipped as non-finite, and the error
    names that tensor and the checkpoint instead of advising a lower learning rate (exit 1, no traceback)."""
    import torch
    from safetensors.torch import load_file, save_file

    d, config, _ = workdir
    tensors = load_file(os.path.join(d, "base.safetensors"))
    name = "model.layers.1.feed_forward.w2.weight"
    tensors[name].view(-1)[7] = float("nan")
    damaged = os.path.join(d, "nan_base.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, damaged)
    r = run(config, os.path.join(d, "nan"), "--load_checkpoint", damaged)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"weights are not finite ({name})" in r.stderr and "Lower the learning rate" not in r.stderr
    assert torch.isnan(tensors[name]).any()
