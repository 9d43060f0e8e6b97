"""The parity harness shared by the distributed and end-to-end tiers and bench/parallel_parity.py.

``make_workdir`` writes a tiny Llama2 config (every size divisible by 8, so any layout of 8 ranks
fits), a learnable random token dataset and a random base checkpoint; ``run_single`` and
``run_layout`` run run_finetune.py on them in one process or on dp x mp CPU ranks (gloo, through
scripts/launcher.sh, optionally as two "nodes"); ``losses`` reads a run's metrics.jsonl and
``compare`` gives the largest relative difference per step, to hold within ``RTOL``.
"""
from __future__ import annotations

import json
import shlex
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)

GLOBAL_BATCH, STEPS, SEQ = 8, 6, 96
# fp32 everywhere. Layouts change only the order of floating-point sums (all-reduce, sharded
# matmuls, the loss over vocabulary shards): measured differences are <= 6e-7 relative for both the
# loss and the gradient norm over 6 AdamW steps on every layout. 1e-5 leaves 15x headroom and still
# catches real errors: frozen norm weights left trainable by torch's SequenceParallel (a bug this
# bench found) moved the loss by only 6e-5 but the gradient norm by 1e-2 -- hence both are compared.
RTOL = 1e-5
MODEL = {"seq_length": SEQ, "max_position_embedding": SEQ, "hidden_size": 64, "num_layers": 2,
         "num_heads": 8, "n_kv_heads": 8, "vocab_size": 1000, "multiple_of": 16,
         "compute_dtype": "float32", "param_init_type": "float32", "rotary_dtype": "float32",
         "layernorm_compute_type": "float32", "softmax_compute_type": "float32"}
LAYOUTS = [(8, 1), (4, 2), (2, 4), (1, 8)]
ALL_OFF = {"parallel.enable_parallel_optimizer": False, "parallel_config.use_seq_parallel": False,
           "parallel_config.vocab_emb_dp": True, "recompute_config.recompute": False}
ALL_ON = {"parallel.enable_parallel_optimizer": True, "parallel_config.use_seq_parallel": True,
          "parallel_config.vocab_emb_dp": False, "recompute_config.recompute": True}


def make_workdir(d: str) -> str:
    """Dataset, base checkpoint and config in ``d``; returns the config path."""
    import datasets
    import torch
    import yaml

    from mftune.checkpoint.formats.single_file import save_complete
    from mftune.checkpoint.load import unique_state_dict
    from mftune.models.llama import LlamaForCausalLM

    g = torch.Generator().manual_seed(0)
    n = GLOBAL_BATCH * STEPS
    # learnable records: arithmetic progressions of token ids, so that the loss moves within a few
    # steps and the gradients (not only the forward) are compared
    start = torch.randint(3, MODEL["vocab_size"], (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    ids = 3 + (start + stride * torch.arange(SEQ + 1)) % (MODEL["vocab_size"] - 3)
    labels = ids.clone()
    prompt = torch.randint(5, SEQ // 2, (n,), generator=g)
    for i in range(n):  # a prompt (ignored) then an answer, then some padding (ignored)
        labels[i, : prompt[i]] = -100
        labels[i, SEQ - 4 * (i % 5):] = -100
    datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()}).save_to_disk(
        os.path.join(d, "data"))
    torch.manual_seed(1)
    model = LlamaForCausalLM(dict(MODEL))
    save_complete(os.path.join(d, "base.safetensors"), unique_state_dict(model),
                  model_config=model.config.to_dict())
    with open(os.path.join(ROOT, "configs/llama2/lora_llama2_7b.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["model"]["model_config"].update(MODEL)
    cfg["model"]["model_config"]["pet_config"]["lora_dropout"] = 0.0  # dropout masks differ by layout
    cfg["train_dataset"]["data_loader"]["dataset_dir"] = os.path.join(d, "data")
    cfg["train_dataset"]["data_loader"]["shuffle"] = True
    cfg["runner_config"].update({"epochs": 1, "batch_size": GLOBAL_BATCH, "sink_mode": False})
    for section in ("optimizer", "lr_schedule"):
        cfg[section]["learning_rate"] = 5e-3
    for callback in cfg["callbacks"]:  # every rank saves its shards at step 4 and at the end
        if callback["type"] == "CheckpointMonitor":
            callback["save_checkpoint_steps"] = 4
    cfg["load_checkpoint"] = os.path.join(d, "base.safetensors")
    path = os.path.join(d, "parity.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def with_pet_config(config: str, pet_config: dict, name: str) -> str:
    """A copy of ``config`` (a YAML path) whose pet_config is ``pet_config``, written beside it as ``name``."""
    import yaml

    with open(config) as f:
        cfg = yaml.safe_load(f)
    cfg["model"]["model_config"]["pet_config"] = pet_config
    path = os.path.join(os.path.dirname(config), name)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(config: str, run_mode: str, out: str, dp: int, mp: int, options: dict,
          grad_accum: int = 1) -> list[str]:
    """run_finetune.py's arguments for a global batch of GLOBAL_BATCH = batch_size x dp x grad_accum."""
    args = ["run_finetune.py", "--config", config, "--run_mode", run_mode, "--output_dir", out,
            "--batch_size", str(GLOBAL_BATCH // (dp * grad_accum)),
            "--gradient_accumulation_steps", str(grad_accum)]
    if run_mode == "train":  # full-parameter training: no pet_config (it applies in every run mode)
        args += ["--model.model_config.pet_config", "null"]
    if dp * mp > 1:
        args += ["--use_parallel", "True", "--parallel_config.data_parallel", str(dp),
                 "--parallel_config.model_parallel", str(mp)]
    else:
        args += ["--use_parallel", "False"]
    for key, value in options.items():
        args += [f"--{key}", str(value)]
    return args


def run_single(config: str, run_mode: str, out: str, options: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *_args(config, run_mode, out, 1, 1, options or {})], cwd=ROOT,
                          capture_output=True, text=True)


def run_layout(config: str, run_mode: str, out: str, dp: int, mp: int, options: dict,
               nodes: int = 1, grad_accum: int = 1) -> subprocess.CompletedProcess:
    """dp x mp ranks through scripts/launcher.sh; ``nodes=2`` runs the multi-node form twice on
    this machine (NODE_RANK 0 and 1, world/2 ranks each) and returns both nodes' output."""
    order = shlex.join(_args(config, run_mode, out, dp, mp, options, grad_accum))  # values may hold quotes
    world, port, logs = dp * mp, str(free_port()), os.path.join(out, "msrun_log")
    if nodes == 1:
        return subprocess.run(["bash", "scripts/launcher.sh", order, str(world), port, logs, "True", "600"],
                              cwd=ROOT, capture_output=True, text=True)
    local = world // nodes
    procs = [subprocess.Popen(["bash", "scripts/launcher.sh", order, str(world), str(local), "127.0.0.1",
                               port, str(rank), logs, "True", "600"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(nodes)]
    outs = [p.communicate() for p in procs]
    rc = max(p.returncode for p in procs)
    return subprocess.CompletedProcess(procs[0].args, rc, "".join(o[0] for o in outs), "")


def losses(out: str, key: str = "loss") -> list[float]:
    """Per-step ``key`` (loss, global_norm) of a run's metrics.jsonl ([] when there is none)."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)[key] for line in f if line.strip()]


def compare(reference: list[float], got: list[float]) -> float:
    """Max relative difference per step (inf when the step counts differ)."""
    if len(reference) != len(got) or not reference:
        return float("inf")
    return max(abs(a - b) / abs(a) for a, b in zip(reference, got))
