"""Every (data_parallel, model_parallel) layout against one process: per-step losses.

    python bench/parallel_parity.py [--workdir DIR] [--quick]

Builds a tiny Llama2 (8 heads, 8 kv heads, FFN 176, vocab 1000, seq 96: every size divisible by 8),
a random base checkpoint and a random token dataset, then runs run_finetune.py once in one process
and, through ``scripts/launcher.sh``, on 8 CPU ranks (gloo) for (8,1), (4,2), (2,4), (1,8), each
with everything off and with enable_parallel_optimizer + use_seq_parallel + vocab-parallel
embedding/lm_head (vocab_emb_dp False) + recompute + 2 gradient-accumulation steps (where the
batch allows) on, for LoRA (finetune) and full-parameter
(train) runs. The global batch (8 sequences) and the seed are the same everywhere, so the
metrics.jsonl losses and gradient norms must agree; the tolerance is ``RTOL``.

Prints one line per run: layout, options, max relative loss and global_norm differences, seconds.
tests/test_parallel.py imports these functions for its smaller subset.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    if dp * mp > 1:
        args += ["--use_parallel", "True", "--parallel_config.data_parallel", str(dp),
                 "--parallel_config.model_parallel", str(mp)]
    else:
        args += ["--use_parallel", "False"]
    for key, value in options.items():
        args += [f"--{key}", str(value)]
    return args


def run_single(config: str, run_mode: str, out: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *_args(config, run_mode, out, 1, 1, {})], cwd=ROOT,
                          capture_output=True, text=True)


def run_layout(config: str, run_mode: str, out: str, dp: int, mp: int, options: dict,
               nodes: int = 1, grad_accum: int = 1) -> subprocess.CompletedProcess:
    """dp x mp ranks through scripts/launcher.sh; ``nodes=2`` runs the multi-node form twice on
    this machine (NODE_RANK 0 and 1, world/2 ranks each) and returns both nodes' output."""
    order = " ".join(_args(config, run_mode, out, dp, mp, options, grad_accum))
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--quick", action="store_true", help="LoRA only, all options on")
    args = parser.parse_args()
    d = args.workdir or tempfile.mkdtemp(prefix="mftune-parity-")
    config = make_workdir(d)
    failed = 0
    for run_mode in ("finetune",) if args.quick else ("finetune", "train"):
        ref_out = os.path.join(d, f"{run_mode}-single")
        r = run_single(config, run_mode, ref_out)
        if r.returncode:
            print(r.stdout[-3000:], r.stderr[-3000:])
            return 1
        ref, ref_norm = losses(ref_out), losses(ref_out, "global_norm")
        print(f"{run_mode} one process: losses {['%.6f' % x for x in ref]}")
        for dp, mp in LAYOUTS:
            for name, options in (("all off", ALL_OFF), ("all on", ALL_ON)):
                if args.quick and name == "all off":
                    continue
                out = os.path.join(d, f"{run_mode}-{dp}x{mp}-{name.replace(' ', '_')}")
                start = time.time()
                grad_accum = 2 if options is ALL_ON and GLOBAL_BATCH // dp >= 2 else 1
                r = run_layout(config, run_mode, out, dp, mp, options, grad_accum=grad_accum)
                diff = compare(ref, losses(out)) if r.returncode == 0 else float("inf")
                norm_diff = compare(ref_norm, losses(out, "global_norm")) if r.returncode == 0 else float("inf")
                ok = max(diff, norm_diff) <= RTOL
                failed += not ok
                print(f"{run_mode:8s} dp={dp} mp={mp} {name:7s}: max rel diff loss {diff:.2e}, "
                      f"global_norm {norm_diff:.2e} {'ok' if ok else 'FAIL'} ({time.time() - start:.0f} s)")
                if r.returncode:
                    print(r.stdout[-3000:], r.stderr[-3000:])
    print(f"workdir: {d}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
