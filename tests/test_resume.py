"""--resume_training against the uninterrupted run: bitwise in one process (dropout on, so the
RNG state is restored too), within the multi-rank tolerance after a change of layout."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import parallel_parity as pp  # noqa: E402

DROPOUT = {"model.model_config.pet_config.lora_dropout": 0.1}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("resume"))
    return d, pp.make_workdir(d)  # CheckpointMonitor saves at step 4 and at the end (6)


def _run(args):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def full(workdir):
    """The uninterrupted one-process run, LoRA dropout on."""
    d, config = workdir
    _run(pp._args(config, "finetune", os.path.join(d, "full"), 1, 1, DROPOUT))
    return os.path.join(d, "full")


def test_one_process_resume_is_bitwise(workdir, full):
    d, config = workdir
    resumed = os.path.join(d, "resumed")
    ckpt_dir = os.path.join(full, "checkpoint")
    r = _run(pp._args(config, "finetune", resumed, 1, 1, DROPOUT) +
             ["--load_checkpoint", ckpt_dir, "--resume_training", "llama_7b_lora_rank_0-1_4"])
    assert "Resuming from" in r.stdout + r.stderr
    assert pp.losses(resumed) == pp.losses(full)[4:]  # steps 5 and 6, bit for bit
    assert pp.losses(resumed, "global_norm") == pp.losses(full, "global_norm")[4:]
    # resume_training True takes the newest step saved by every rank folder: the final one (6),
    # after which nothing is left to train
    again = os.path.join(d, "again")
    _run(pp._args(config, "finetune", again, 1, 1, DROPOUT) + ["--load_checkpoint", ckpt_dir,
                                                               "--resume_training", "True"])
    assert pp.losses(again) == []


def test_resume_on_another_layout(workdir):
    """Saved by 4 ranks (dp 2, mp 2, FSDP2 + sequence parallel + vocab-parallel), resumed by 2
    ranks (dp 1, mp 2, replicas): steps 5-6 match the one-process run."""
    d, config = workdir
    single, saved, resumed = (os.path.join(d, n) for n in ("single", "saved-2x2", "resumed-1x2"))
    _run(pp._args(config, "finetune", single, 1, 1, {}))
    order = " ".join(pp._args(config, "finetune", saved, 2, 2, pp.ALL_ON))
    r = subprocess.run(["bash", "scripts/launcher.sh", order, "4", str(pp.free_port()),
                        os.path.join(saved, "msrun_log"), "True", "600"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
    options = dict(pp.ALL_OFF, load_checkpoint=os.path.join(saved, "checkpoint"),
                   resume_training="llama_7b_lora_rank_0-1_4")
    order = " ".join(pp._args(config, "finetune", resumed, 1, 2, options))
    r = subprocess.run(["bash", "scripts/launcher.sh", order, "2", str(pp.free_port()),
                        os.path.join(resumed, "msrun_log"), "True", "600"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
    assert pp.compare(pp.losses(single)[4:], pp.losses(resumed)) <= pp.RTOL
    assert pp.compare(pp.losses(single, "global_norm")[4:], pp.losses(resumed, "global_norm")) <= pp.RTOL


def test_one_process_resume_through_auto_trans_ckpt_is_bitwise(workdir, full):
    """--auto_trans_ckpt True writes the checkpoint for this layout (one complete file here) under
    output_dir/transformed_checkpoint and resumes from it; the RNG state comes from the saved file."""
    d, config = workdir
    out = os.path.join(d, "resumed-auto-trans")
    args = pp._args(config, "finetune", out, 1, 1, DROPOUT) + [
        "--load_checkpoint", os.path.join(full, "checkpoint"), "--resume_training", "llama_7b_lora_rank_0-1_4",
        "--auto_trans_ckpt", "True", "--transform_process_num", "4"]  # clamped to the one rank
    r = _run(args)
    assert "transform_process_num=4 > world size 1" in r.stdout + r.stderr
    assert pp.losses(out) == pp.losses(full)[4:]
    assert pp.losses(out, "global_norm") == pp.losses(full, "global_norm")[4:]
    done = os.path.join(out, "transformed_checkpoint", "checkpoint")
    assert sorted(os.listdir(done)) == ["rank_0", "transform_succeed_rank_0.txt"]
    assert sorted(os.listdir(os.path.join(done, "rank_0"))) == ["checkpoint_0.safetensors", "meta.json"]
    # a second run replaces its own earlier transform; the source is untouched
    before = sorted(os.listdir(os.path.join(full, "checkpoint", "rank_0")))
    _run(args)
    assert pp.losses(out) == pp.losses(full)[4:]
    assert sorted(os.listdir(os.path.join(full, "checkpoint", "rank_0"))) == before


def test_auto_trans_ckpt_never_writes_over_its_source(workdir, full):
    """load_checkpoint inside output_dir/transformed_checkpoint/<name> (a previous transform) would
    be cleared by the new transform: refused, nothing removed."""
    d, config = workdir
    out = os.path.join(d, "resumed-auto-trans")
    src = os.path.join(out, "transformed_checkpoint", "checkpoint")
    if not os.path.isdir(src):
        pytest.skip("needs test_one_process_resume_through_auto_trans_ckpt_is_bitwise's output")
    before = sorted(os.listdir(src))
    r = subprocess.run([sys.executable, *pp._args(config, "finetune", out, 1, 1, {}), "--load_checkpoint", src,
                        "--auto_trans_ckpt", "True"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "source would be overwritten" in r.stderr
    assert sorted(os.listdir(src)) == before
