"""--resume_training against the uninterrupted run: bitwise in one process (dropout on, so the
RNG state is restored too), within the multi-rank tolerance after a change of layout."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import parity as pp  # noqa: E402

# LoRA dropout (the RNG state must be restored) and a dynamic loss scale that doubles after every 5
# good steps: after step 5, so step 6 runs with twice the scale only if the resumed run (from
# step 4) knows that 4 good steps had passed
DROPOUT = {"model.model_config.pet_config.lora_dropout": 0.1}
DYNAMIC = {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 1024, "scale_factor": 2, "scale_window": 5}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("resume"))
    with open(pp.make_workdir(d)) as f:  # CheckpointMonitor saves at step 4 and at the end (6)
        cfg = yaml.safe_load(f)
    cfg["runner_wrapper"]["scale_sense"] = DYNAMIC
    config = os.path.join(d, "dynamic.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    return d, config


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
    assert pp.losses(resumed, "loss_scale") == pp.losses(full, "loss_scale")[4:] == [1024, 2048]
    # resume_training True takes the newest step saved by every rank folder: the final one (6),
    # after which nothing is left to train: an error saying to raise --epochs (tests/e2e/test_silent_runs.py)
    again = os.path.join(d, "again")
    r = subprocess.run([sys.executable, *pp._args(config, "finetune", again, 1, 1, DROPOUT), "--load_checkpoint",
                        ckpt_dir, "--resume_training", "True"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "Raise --epochs" in r.stderr, r.stderr[-2000:]
    assert pp.losses(again) == []


def _assert_resumes_bitwise(d, config, name: str, options: dict) -> None:
    """Six steps in one process, then a run resumed from its step-4 checkpoint: steps 5-6 give the same losses and
    gradient norms, bit for bit."""
    full, resumed = os.path.join(d, f"{name}-full"), os.path.join(d, f"{name}-resumed")
    _run(pp._args(config, "finetune", full, 1, 1, options))
    _run(pp._args(config, "finetune", resumed, 1, 1, options) +
         ["--load_checkpoint", os.path.join(full, "checkpoint"), "--resume_training", "llama_7b_lora_rank_0-1_4"])
    assert pp.losses(resumed) == pp.losses(full)[4:]
    assert pp.losses(resumed, "global_norm") == pp.losses(full, "global_norm")[4:]


def test_lora_variants_resume_bitwise(workdir):
    """rsLoRA, DoRA, LoRA+ and a trained lm_head (docs/pet.md): the resumed run restores the DoRA magnitudes and
    lm_head, rebuilds B's learning-rate groups and continues exactly."""
    d, config = workdir
    variants = {**DROPOUT, "model.model_config.pet_config.use_rslora": True,
                "model.model_config.pet_config.use_dora": True, "model.model_config.pet_config.lora_plus_lr_ratio": 16,
                "model.model_config.pet_config.modules_to_save": '["lm_head"]'}
    _assert_resumes_bitwise(d, config, "variants", variants)


def test_olora_resumes_bitwise(workdir):
    """OLoRA (docs/pet.md): the resumed run derives A0, B0 from the base again and continues exactly."""
    d, config = workdir
    olora = {**DROPOUT, "model.model_config.pet_config.init_lora_weights": "olora"}
    _assert_resumes_bitwise(d, config, "olora", olora)


def test_prefix_tuning_resumes_bitwise(workdir):
    """P-tuning v2 with its projection, in MindFormers' float16 (docs/pet.md): the resumed run restores the prefix
    table and MLP and their AdamW moments and continues exactly."""
    d, config = workdir
    config = pp.with_pet_config(config, {"pet_type": "ptuning2", "pre_seq_len": 6, "prefix_projection": True,
                                         "projection_dim": 16, "dropout_prob": 0.0}, "ptuning2.yaml")
    _assert_resumes_bitwise(d, config, "ptuning2", {})


@pytest.fixture(scope="module")
def single(workdir):
    """The one-process run without dropout: the reference of multi-rank runs."""
    d, config = workdir
    _run(pp._args(config, "finetune", os.path.join(d, "single"), 1, 1, {}))
    return os.path.join(d, "single")


def test_resume_on_another_layout(workdir, single):
    """Saved by 4 ranks (dp 2, mp 2, FSDP2 + sequence parallel + vocab-parallel), resumed by 2
    ranks (dp 1, mp 2, replicas): steps 5-6 match the one-process run."""
    d, config = workdir
    saved, resumed = (os.path.join(d, n) for n in ("saved-2x2", "resumed-1x2"))
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
    # a second run replaces its own earlier transform (stale files of another layout go); the
    # source is untouched
    before = sorted(os.listdir(os.path.join(full, "checkpoint", "rank_0")))
    shutil.copytree(os.path.join(done, "rank_0"), os.path.join(done, "rank_1"))
    open(os.path.join(done, "transform_failed_rank_0.txt"), "w").close()
    _run(args)
    assert pp.losses(out) == pp.losses(full)[4:]
    assert sorted(os.listdir(done)) == ["rank_0", "transform_succeed_rank_0.txt"]
    assert sorted(os.listdir(os.path.join(full, "checkpoint", "rank_0"))) == before
    # the transformed folder is a training checkpoint too: resumable (no step in its file names:
    # its meta.json's file), though without the RNG state, which belongs to the saving layout
    again = os.path.join(d, "resumed-from-transformed")
    r = _run(pp._args(config, "finetune", again, 1, 1, DROPOUT) + ["--load_checkpoint", done, "--resume_training", "True"])
    assert "holds no RNG state" in r.stdout + r.stderr
    assert pp.losses(again, "step") == [5, 6]


def test_auto_trans_ckpt_never_writes_over_its_source(workdir, full, tmp_path):
    """A load_checkpoint inside output_dir/transformed_checkpoint/<name> would be cleared by the
    new transform, and a folder there that no transform wrote would be overwritten: both refused,
    nothing removed."""
    d, config = workdir
    out = str(tmp_path / "out")
    src = os.path.join(out, "transformed_checkpoint", "checkpoint")
    shutil.copytree(os.path.join(full, "checkpoint"), src)
    before = sorted(os.listdir(os.path.join(src, "rank_0")))
    base = [sys.executable, *pp._args(config, "finetune", out, 1, 1, {}), "--auto_trans_ckpt", "True"]
    r = subprocess.run(base + ["--load_checkpoint", src], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "source would be overwritten" in r.stderr
    r = subprocess.run(base + ["--load_checkpoint", os.path.join(full, "checkpoint")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "is not the output of a checkpoint transform" in r.stderr, r.stderr[-2000:]
    assert sorted(os.listdir(os.path.join(src, "rank_0"))) == before
    # the run's own strategy folder is rewritten at start-up: not a source strategy
    r = subprocess.run(base + ["--load_checkpoint", os.path.join(full, "checkpoint"),
                               "--src_strategy_path_or_dir", os.path.join(out, "strategy")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "inside this run's own strategy folder" in r.stderr, r.stderr[-2000:]


def test_rng_states_restored_per_rank_in_the_same_layout(workdir):
    """2 data-parallel ranks with LoRA dropout (each rank its own masks): the resumed run equals
    the uninterrupted 2-rank run bit for bit, which needs every rank's RNG state back."""
    d, config = workdir
    full2, resumed2 = os.path.join(d, "full-2dp"), os.path.join(d, "resumed-2dp")
    for out, extra in ((full2, {}), (resumed2, {"load_checkpoint": os.path.join(full2, "checkpoint"),
                                                "resume_training": "llama_7b_lora_rank_0-1_4"})):
        order = " ".join(pp._args(config, "finetune", out, 2, 1, dict(DROPOUT, **extra)))
        r = subprocess.run(["bash", "scripts/launcher.sh", order, "2", str(pp.free_port()),
                            os.path.join(out, "msrun_log"), "True", "600"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:]
    assert pp.losses(resumed2) == pp.losses(full2)[4:]
    assert pp.losses(resumed2, "global_norm") == pp.losses(full2, "global_norm")[4:]


def test_auto_trans_ckpt_writes_the_base_for_2_tensor_parallel_ranks(workdir, single):
    """A complete base checkpoint with --auto_trans_ckpt True on (dp 1, mp 2): each rank's file
    holds its half of wq and the whole norms; training from it matches the one-process run."""
    d, config = workdir
    out = os.path.join(d, "auto-trans-1x2")
    order = " ".join(pp._args(config, "finetune", out, 1, 2, {"auto_trans_ckpt": True}))
    r = subprocess.run(["bash", "scripts/launcher.sh", order, "2", str(pp.free_port()),
                        os.path.join(out, "msrun_log"), "True", "600"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
    assert pp.compare(pp.losses(single), pp.losses(out)) <= pp.RTOL
    from mftune.checkpoint.safetensors_io import load_tensors
    base = load_tensors(os.path.join(d, "base.safetensors"))
    wq, norm = "model.layers.0.attention.wq.weight", "model.norm_out.weight"
    half = base[wq].shape[0] // 2
    for rank in range(2):
        got = load_tensors(os.path.join(out, "transformed_checkpoint", "base", f"rank_{rank}",
                                        f"checkpoint_{rank}.safetensors"))
        assert torch.equal(got[wq], base[wq][rank * half:(rank + 1) * half])
        assert torch.equal(got[norm], base[norm])
