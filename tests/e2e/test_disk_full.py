"""A disk that fills up during a save, for real (issue 14, item 4): the commands run with a file size limit
(``RLIMIT_FSIZE``, SIGXFSZ ignored, so that a write past it fails with EFBIG as on a full disk instead of
killing the process). The run stops with exit status 2 and a message naming the file and the free space, no
temporary file is left, meta.json and the checkpoint it names are unchanged, and a later run resumes from them;
a failing run moves the previous run's files aside instead of overwriting them. Free-space checks before a save
and the messages are tests/unit/test_disk_space.py; a full disk on one rank of two is
tests/distributed/test_disk_full_ranks.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import parity as pp  # noqa: E402

CKPT = "llama_7b_lora_rank_0-1_{}.safetensors"  # parity's run saves steps 4 and 6 (its end)
LIMIT = 100_000  # bytes: above every other file a run writes before its first save (log, config, strategy
# ~9 kB each), below parity's LoRA training checkpoint (~210 kB)


def _limited(limit: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # stays ignored across exec: writes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def run(args: list[str], limit: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    env.pop("MFTUNE_DEBUG", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
                          preexec_fn=_limited(limit) if limit else None)


def _train(config: str, out: str, *extra: str, limit: int | None = None) -> subprocess.CompletedProcess:
    return run(["run_finetune.py", "--config", config, "--run_mode", "finetune", "--use_parallel", "False",
                "--batch_size", str(pp.GLOBAL_BATCH), "--output_dir", out, *extra], limit)


def _digests(folder: str) -> dict[str, str]:
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


def _temporaries(folder: str) -> list[str]:
    return [os.path.join(d, n) for d, dirs, files in os.walk(folder) for n in files + dirs if ".tmp" in n]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """parity's config and a finished one-epoch run (checkpoints at steps 4 and 6) in ``out``."""
    d = str(tmp_path_factory.mktemp("disk_full"))
    config, out = pp.make_workdir(d), os.path.join(d, "out")
    r = _train(config, out)
    assert r.returncode == 0, r.stderr[-3000:]
    return config, out


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(trained):
    config, out = trained
    ckpt = os.path.join(out, "checkpoint", "rank_0")
    before = _digests(ckpt)
    assert os.path.getsize(os.path.join(ckpt, CKPT.format(6))) > LIMIT
    resume = ["--load_checkpoint", os.path.join(out, "checkpoint"), "--resume_training", "True", "--epochs", "2"]
    r = _train(config, out, *resume, limit=LIMIT)  # into the same output_dir and checkpoint folder
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout[-2000:] + r.stderr[-3000:]
    message = r.stderr.strip().splitlines()[-1]
    failed = os.path.join(ckpt, "llama_7b_lora_rank_0_1-2_2.safetensors")  # this run's prefix; global step 8
    assert message.startswith(f"mftune: error: not enough disk space to save step 8: writing {failed} failed "
                              f"(File too large (a file size limit: ulimit -f)); "), message
    assert f"free in {ckpt}, this rank's files of the step take ~" in message
    assert "The partial file was removed." in message
    assert message.endswith(f"the previous checkpoint {os.path.join(ckpt, CKPT.format(6))} is intact."), message
    assert _digests(ckpt) == before and _temporaries(out) == []  # meta.json too: it still names step 6
    # the failed run moved the first run's files aside; its own metrics are steps 7 and 8
    with open(os.path.join(out, "run_summary.json.1")) as f:
        assert json.load(f)["checkpoint"] == os.path.join(ckpt, CKPT.format(6))
    assert pp.losses(out, "step") == [7, 8]
    assert "were moved to *.1" in r.stdout and not os.path.exists(os.path.join(out, "run_summary.json"))

    r = _train(config, out, *resume)  # space again: resumes from the intact step 6 and finishes
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Resuming from {os.path.join(ckpt, CKPT.format(6))}" in r.stdout + r.stderr
    assert pp.losses(out, "step") == list(range(7, 13))
    assert os.path.exists(os.path.join(out, "resolved_config.yaml.2")) and _temporaries(out) == []


def test_convert_weight_on_a_full_disk_keeps_the_earlier_output(tmp_path):
    from tiny_hf import hf_model
    hf_dir, folder = str(tmp_path / "hf"), tmp_path / "converted"
    out = str(folder / "model.safetensors")
    hf_model().save_pretrained(hf_dir, safe_serialization=True)
    r = run(["scripts/convert_weight.py", "--input_path", hf_dir, "--output_path", out])
    assert r.returncode == 0, r.stderr[-2000:]
    before = _digests(str(folder))
    size = os.path.getsize(out)
    r = run(["scripts/convert_weight.py", "--input_path", hf_dir, "--output_path", out], limit=size // 2)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"convert_weight.py: error: writing {out} failed: File too large (a file size limit: ulimit -f); " \
           in r.stderr and f"free in {folder}. The partial file was removed." in r.stderr, r.stderr[-2000:]
    assert _digests(str(folder)) == before  # the earlier output unchanged, no temporary file
