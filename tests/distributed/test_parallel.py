"""Multi-rank training (torchrun + gloo on CPU) against one process (the layout checks in one process:
tests/unit/test_parallel_parts.py).

Expected numbers come from a one-process run of the same config, global batch and seed
(tests/parity.py has the setup and the tolerance's justification; bench/parallel_parity.py runs every
layout, this file a representative subset: 8 ranks single-node, 8 ranks as two 4-rank "nodes", and a
full-parameter run).
"""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import parity as pp  # noqa: E402

from mftune.checkpoint.load import load_checkpoint  # noqa: E402
from mftune.checkpoint.safetensors_io import load_tensors, read_metadata  # noqa: E402
from mftune.errors import CheckpointError  # noqa: E402
from mftune.checkpoint.export import export_peft_adapter  # noqa: E402
from mftune.checkpoint.formats.peft_adapter import mftune_to_peft_name  # noqa: E402
from mftune.checkpoint.formats import open_checkpoint  # noqa: E402
from mftune.checkpoint.formats.distributed import distributed_entries  # noqa: E402
from mftune.models.llama import LlamaForCausalLM  # noqa: E402


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """Config, data and base checkpoint, plus the one-process reference runs (LoRA and full)."""
    d = str(tmp_path_factory.mktemp("parity"))
    config = pp.make_workdir(d)
    refs = {}
    for run_mode in ("finetune", "train"):
        out = os.path.join(d, f"{run_mode}-single")
        r = pp.run_single(config, run_mode, out)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        refs[run_mode] = (pp.losses(out), pp.losses(out, "global_norm"))
    return d, config, refs


def _check_parity(refs, run_mode, out, r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref_loss, ref_norm = refs[run_mode]
    assert len(ref_loss) == pp.STEPS
    assert pp.compare(ref_loss, pp.losses(out)) <= pp.RTOL, (ref_loss, pp.losses(out))
    assert pp.compare(ref_norm, pp.losses(out, "global_norm")) <= pp.RTOL


@pytest.fixture(scope="module")
def run_2x4(parity):
    d, config, _ = parity
    out = os.path.join(d, "2x4")  # gradients all-reduced (no FSDP2), 2 accumulation steps
    return out, pp.run_layout(config, "finetune", out, 2, 4, pp.ALL_OFF, grad_accum=2)


def test_8_ranks_dp2_mp4_match_one_process_and_log_per_rank(parity, run_2x4):
    d, config, refs = parity
    out, r = run_2x4
    _check_parity(refs, "finetune", out, r)
    assert "Running Command:" in r.stdout and "Please check log files in" in r.stdout
    logs = os.path.join(out, "msrun_log")
    assert sorted(os.listdir(logs)) == [f"worker_{i}.log" for i in range(8)]
    with open(os.path.join(logs, "worker_0.log")) as f:
        rank0 = f.read()
    assert rank0.count("{ Epoch:[  1/  1], step:[") == pp.STEPS  # MFLossMonitor lines on rank 0
    assert "model_parallel=4" in rank0
    # every rank saved its own shards (step 4 and the final step 6), with meta.json last, and
    # says which block of each sharded tensor it holds
    finals = []
    for rank in range(8):
        ckpt_dir = os.path.join(out, "checkpoint", f"rank_{rank}")
        with open(os.path.join(ckpt_dir, "meta.json")) as f:
            meta = json.load(f)
        assert meta["last_step"] == pp.STEPS
        assert len(glob.glob(os.path.join(ckpt_dir, f"*_rank_{rank}-1_*.safetensors"))) == 2
        finals.append(os.path.join(ckpt_dir, meta["last_ckpt_file"]))
    _check_shards(finals, tp=4)
    # strategy files: every parameter (frozen ones too) with the block the rank holds
    b = "model.layers.0.attention.wq.mindpet_delta_lora_b"
    for rank in range(8):
        with open(os.path.join(out, "strategy", f"ckpt_strategy_rank_{rank}.json")) as f:
            strategy = json.load(f)
        assert strategy["mesh"] == {"dp": 2, "tp": 4} and "model.norm_out.weight" in strategy["tensors"]
        assert strategy["tensors"][b]["block"] == read_metadata(finals[rank])["shards"]["tensors"][b]["block"]


def _check_shards(files, tp):
    """Reassemble the adapters of data-parallel rank 0's tensor-parallel group (ranks 0..tp-1):
    the blocks tile each global tensor, replicated factors (wq's A, wo's B) are identical on every
    rank, and every data-parallel replica holds the same values."""
    a, b = "model.layers.0.attention.wq.mindpet_delta_lora_a", "model.layers.0.attention.wq.mindpet_delta_lora_b"
    wo_a, wo_b = (n.replace(".wq.", ".wo.") for n in (a, b))
    tensors = [load_tensors(f) for f in files]
    shards = [read_metadata(f)["shards"] for f in files]
    entries = open_checkpoint(os.path.dirname(os.path.dirname(files[0])))  # the rank_*/ directory
    assert [s["rank"] for s in shards] == list(range(len(files)))
    for name, split_dim in ((b, 0), (wo_a, 1), (f"adam_m.{b}", 0)):
        info = shards[0]["tensors"][name]
        full = torch.zeros(info["global_shape"])
        for rank in range(tp):
            block = tuple(slice(lo, hi) for lo, hi in shards[rank]["tensors"][name]["block"])
            full[block] = tensors[rank][name]
        assert full.shape[split_dim] == sum(t[name].shape[split_dim] for t in tensors[:tp])
        assert torch.count_nonzero(full) > 0.9 * full.numel()  # every block was trained and filled
        assert torch.equal(entries[name].read(tuple(slice(0, n) for n in full.shape)), full)
    for name in (a, wo_b, f"adam_v.{a}"):
        assert name not in shards[0]["tensors"]  # replicated: held whole
        for rank in range(1, len(files)):
            torch.testing.assert_close(tensors[rank][name], tensors[0][name], rtol=0, atol=0)
    for rank in range(tp, len(files)):  # the next data-parallel replica
        torch.testing.assert_close(tensors[rank][b], tensors[rank - tp][b], rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="one rank's shards"):
        load_checkpoint(LlamaForCausalLM(dict(pp.MODEL)), files[0])
    # a PEFT adapter straight from the distributed checkpoint holds the reassembled adapters
    root = os.path.dirname(os.path.dirname(files[0]))
    adapter = os.path.join(os.path.dirname(root), "adapter")
    export_peft_adapter(root, adapter)
    exported = load_tensors(os.path.join(adapter, "adapter_model.safetensors"))
    for name in (a, b, wo_a, wo_b):
        full = entries[name].read(tuple(slice(0, n) for n in entries[name].shape))
        assert torch.equal(exported[mftune_to_peft_name(name)], full)


def test_auto_trans_ckpt_continues_a_2x4_checkpoint_on_4x2(parity, run_2x4, tmp_path):
    """The (2, 4) run's step-4 checkpoint, resumed by (4, 2) with FSDP2 + sequence parallel +
    vocab-parallel and --auto_trans_ckpt True: the transformed rank files hold the saved values
    bit for bit, steps 5-6 match the one-process run, and both runs' final checkpoints, transformed
    to complete files, hold the same trained tensors."""
    d, config, refs = parity
    saved, r = run_2x4
    assert r.returncode == 0
    out = os.path.join(d, "4x2-auto-trans")
    options = dict(pp.ALL_ON, load_checkpoint=os.path.join(saved, "checkpoint"), auto_trans_ckpt=True,
                   resume_training="llama_7b_lora_rank_0-1_4", transform_process_num=2)
    r = pp.run_layout(config, "finetune", out, 4, 2, options, grad_accum=2)
    assert r.returncode == 0, r.stdout[-3000:]
    assert pp.compare(refs["finetune"][0][4:], pp.losses(out)) <= pp.RTOL
    assert pp.compare(refs["finetune"][1][4:], pp.losses(out, "global_norm")) <= pp.RTOL
    transformed = os.path.join(out, "transformed_checkpoint", "checkpoint")
    assert sorted(f for f in os.listdir(transformed) if f.endswith(".txt")) == [
        "transform_succeed_rank_0.txt", "transform_succeed_rank_4.txt"]
    step4 = [os.path.join(saved, "checkpoint", f"rank_{k}", f"llama_7b_lora_rank_{k}-1_4.safetensors")
             for k in range(8)]
    source, copy = distributed_entries("", step4), open_checkpoint(transformed)
    assert set(copy) == set(source) - {"rng_state"}
    for name, entry in copy.items():
        assert torch.equal(entry.full(), source[name].full()), name
    # distributed -> complete with the offline tool, for both runs' final (step 6) checkpoints
    finals = []
    for run in (saved, out):
        tool = subprocess.run([sys.executable, "scripts/transform_checkpoint.py", "--src_checkpoint",
                               os.path.join(run, "checkpoint"), "--dst_checkpoint_dir", str(tmp_path / os.path.basename(run)),
                               "--src_strategy", os.path.join(run, "strategy")],
                              cwd=ROOT, capture_output=True, text=True)
        assert tool.returncode == 0, tool.stderr
        finals.append(load_tensors(str(tmp_path / os.path.basename(run) / "checkpoint" / "rank_0" / "checkpoint_0.safetensors")))
    assert set(finals[0]) == set(finals[1]) and finals[0]["global_step"] == pp.STEPS
    for name, value in finals[0].items():
        if "lora" in name:  # trained in two layouts: equal up to float rounding
            torch.testing.assert_close(finals[1][name], value, rtol=1e-4, atol=1e-6)


def test_two_node_form_with_every_option_matches_one_process(parity):
    """Two launcher calls (NODE_RANK 0 and 1, 4 ranks each) on this machine; (dp, mp) = (4, 2)
    with FSDP2, sequence parallel, vocab-parallel embedding/lm_head, recompute and 2
    gradient-accumulation steps (batch_size 1 x dp 4 x 2 = the reference's 8)."""
    d, config, refs = parity
    out = os.path.join(d, "4x2-2nodes")
    r = pp.run_layout(config, "finetune", out, 4, 2, pp.ALL_ON, nodes=2, grad_accum=2)
    _check_parity(refs, "finetune", out, r)
    assert "Please run this script on other nodes with different node_rank" in r.stdout
    assert sorted(os.listdir(os.path.join(out, "msrun_log"))) == [f"worker_{i}.log" for i in range(8)]


def test_full_parameter_training_dp2_mp2_matches_one_process(parity):
    """run_mode train: embedding, norms, lm_head and every Linear train, so their sharded and
    replicated gradients (vocab-parallel, sequence-parallel norms) are all compared."""
    d, config, refs = parity
    out = os.path.join(d, "train-2x2")
    world_order = " ".join(pp._args(config, "train", out, 2, 2, pp.ALL_ON))
    r = subprocess.run(["bash", "scripts/launcher.sh", world_order, "4", str(pp.free_port()),
                        os.path.join(out, "msrun_log"), "True", "600"], cwd=ROOT, capture_output=True, text=True)
    _check_parity(refs, "train", out, r)


# scaling alpha / sqrt(r); LoRA+ with B at 2 x the learning rate. (At 16 x, B's rate of 0.08 makes this tiny run
# chaotic: the layouts' fp32 summation orders, 3e-7 apart at step 2, grow to 1e-3 in the gradient norm by step 5.)
LORA_VARIANTS = {"model.model_config.pet_config.use_rslora": True,
                 "model.model_config.pet_config.lora_plus_lr_ratio": 2,
                 "model.model_config.pet_config.init_lora_weights": "pissa",  # A0, B0 from the gathered weights
                 "model.model_config.pet_config.modules_to_save": '["lm_head"]'}  # vocab-parallel under ALL_ON


def test_rslora_and_lora_plus_dp2_mp2_with_every_option_match_one_process(parity):
    """The LoRA variants (docs/pet.md: rsLoRA, LoRA+, PiSSA, a trained lm_head) on 4 ranks with FSDP2, sequence
    parallel, recompute and a vocab-parallel embedding and lm_head: the one-process losses and gradient norms of the
    same variants (which differ from plain LoRA's)."""
    d, config, refs = parity
    single, out = os.path.join(d, "variants-single"), os.path.join(d, "variants-2x2")
    r = pp.run_single(config, "finetune", single, LORA_VARIANTS)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert pp.compare(refs["finetune"][0], pp.losses(single)) > 1e-4  # the variants change training
    r = pp.run_layout(config, "finetune", out, 2, 2, {**pp.ALL_ON, **LORA_VARIANTS})
    _check_parity({"finetune": (pp.losses(single), pp.losses(single, "global_norm"))}, "finetune", out, r)


# prefix tuning and P-tuning v2 (docs/pet.md), the prefix computed in float32 (with MindFormers' float16 default the
# layouts round the prefix gradients in float16 in different orders: gradient norms 1e-4 apart, losses 2e-7)
PREFIX_METHODS = {"prefixtuning": {"pet_type": "prefixtuning", "prefix_token_num": 4, "mid_dim": 16,
                                   "dropout_rate": 0.0, "compute_dtype": "float32"},
                  "ptuning2": {"pet_type": "ptuning2", "pre_seq_len": 6, "dropout_prob": 0.0,
                               "compute_dtype": "float32"}}


@pytest.mark.parametrize("method", list(PREFIX_METHODS))
def test_prefix_methods_dp2_mp2_with_every_option_match_one_process(parity, method):
    """Prefix tuning (with its projection MLP) and P-tuning v2 (the table alone) on 4 ranks with FSDP2 (the prefix
    its own group), tensor parallel (each rank's attention takes its heads of the prefix), sequence parallel,
    recompute and a vocab-parallel lm_head: the one-process losses and gradient norms."""
    d, config, refs = parity
    config = pp.with_pet_config(config, PREFIX_METHODS[method], f"{method}.yaml")
    single, out = os.path.join(d, f"{method}-single"), os.path.join(d, f"{method}-2x2")
    r = pp.run_single(config, "finetune", single)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert pp.compare(refs["finetune"][0], pp.losses(single)) > 1e-4  # not LoRA's run
    r = pp.run_layout(config, "finetune", out, 2, 2, pp.ALL_ON)
    _check_parity({"finetune": (pp.losses(single), pp.losses(single, "global_norm"))}, "finetune", out, r)


def test_dora_dp2_mp2_with_every_option_matches_one_process(parity):
    """DoRA (docs/pet.md) on 4 ranks with FSDP2, tensor and sequence parallel, recompute, also on a vocab-parallel
    lm_head (target_modules naming it): each rank initialises the magnitudes of its rows from the loaded weights, a
    row-parallel layer's (wo) from partial sums of squares added over the tensor-parallel ranks; the losses and
    gradient norms are the one-process run's."""
    d, config, refs = parity
    dora = {"model.model_config.pet_config.use_dora": True,
            "model.model_config.pet_config.target_modules": ".*wq|.*wk|.*wv|.*wo|lm_head"}
    single, out = os.path.join(d, "dora-single"), os.path.join(d, "dora-2x2")
    r = pp.run_single(config, "finetune", single, dora)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert pp.compare(refs["finetune"][0], pp.losses(single)) > 3 * pp.RTOL  # DoRA trains otherwise than LoRA
    r = pp.run_layout(config, "finetune", out, 2, 2, {**pp.ALL_ON, **dora})
    _check_parity({"finetune": (pp.losses(single), pp.losses(single, "global_norm"))}, "finetune", out, r)


def test_use_parallel_without_launcher_is_a_clear_error(parity):
    _, config, _ = parity
    r = subprocess.run([sys.executable, "run_finetune.py", "--config", config, "--run_mode", "finetune",
                        "--use_parallel", "True"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert "use_parallel=True is invalid" in r.stderr and "scripts/launcher.sh" in r.stderr
    assert "Traceback" not in r.stderr


def test_launcher_with_use_parallel_false_is_refused(parity):
    _, config, _ = parity
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
    r = subprocess.run([sys.executable, "run_finetune.py", "--config", config, "--run_mode", "finetune",
                        "--use_parallel", "False"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "--use_parallel True" in r.stderr


FP16 = {"model.model_config.compute_dtype": "float16", "model.model_config.param_init_type": "float16",
        "runner_wrapper.scale_sense.type": "DynamicLossScaleUpdateCell",
        "runner_wrapper.scale_sense.loss_scale_value": 1024, "runner_wrapper.scale_sense.scale_factor": 2,
        "runner_wrapper.scale_sense.scale_window": 2}


def test_fp16_with_dynamic_loss_scale_on_2_fsdp_ranks(parity):
    """float16 compute, fp32 masters, DynamicLossScaleUpdateCell: the loss scale doubles every
    scale_window clean steps on every rank as in one process, and the losses agree to fp16
    rounding (1e-3: half-precision matmuls summed in a different order)."""
    d, config, _ = parity
    single, multi = os.path.join(d, "fp16-single"), os.path.join(d, "fp16-2x1")
    args = pp._args(config, "finetune", single, 1, 1, FP16)
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    options = dict(FP16, **{"parallel.enable_parallel_optimizer": True})
    order = " ".join(pp._args(config, "finetune", multi, 2, 1, options))
    r = subprocess.run(["bash", "scripts/launcher.sh", order, "2", str(pp.free_port()),
                        os.path.join(multi, "msrun_log"), "True", "600"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
    assert pp.losses(multi, "loss_scale") == pp.losses(single, "loss_scale") == [1024, 1024, 2048, 2048, 4096, 4096]
    assert pp.compare(pp.losses(single), pp.losses(multi)) < 1e-3


def test_pipeline_stages_run_as_data_parallel_with_mindformers_names(parity):
    """MindFormers' documented command names (scripts/msrun_launcher.sh, run_mindformer.py) and a
    pipeline layout: pipeline_stage 2 with micro_batch_num 4 runs as 2 FSDP data-parallel ranks with
    2 accumulation steps: MindFormers' global batch (batch_size x data_parallel x micro_batch_num),
    the one-process losses and norms. Its gradient_accumulation_steps is not used (as in MindFormers)."""
    d, config, refs = parity
    out = os.path.join(d, "pp2")
    order = ["run_mindformer.py", "--config", config, "--run_mode", "finetune", "--output_dir", out,
             "--use_parallel", "True", "--batch_size", str(pp.GLOBAL_BATCH // 4), "--gradient_accumulation_steps",
             "3", "--parallel_config.data_parallel", "1", "--parallel_config.model_parallel", "1",
             "--parallel_config.pipeline_stage", "2", "--parallel_config.micro_batch_num", "4",
             "--parallel.enable_parallel_optimizer", "True"]
    r = subprocess.run(["bash", "scripts/msrun_launcher.sh", " ".join(order), "2", str(pp.free_port()),
                        os.path.join(out, "msrun_log"), "True", "600"], cwd=ROOT, capture_output=True, text=True)
    _check_parity(refs, "finetune", out, r)
    log = open(os.path.join(out, "msrun_log", "worker_0.log")).read()
    assert "pipeline_stage=2 runs as data parallel: data_parallel 1 -> 2, micro_batch_num=4 -> 2 gradient " \
           "accumulation steps" in log and "gradient_accumulation_steps=3 is not used" in log
