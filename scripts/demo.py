#!/usr/bin/env python
"""The embedded default: the whole MindFormers LoRA workflow on bundled data, on a CPU, in minutes.

Steps (each one is the user-facing command, run as a subprocess):
  1. scripts/alpaca_converter.py   bundled alpaca JSON -> conversation JSON
  2. train a small sentencepiece tokenizer on that data
  3. scripts/llama_preprocess.py   conversations -> tokenized records (seq_length + 1)
  4. run_finetune.py --run_mode train      a small base model, all parameters (pet_config null)
  5. run_finetune.py --run_mode finetune   LoRA on the base checkpoint from step 4
and draws both loss curves into <output_dir>/loss_curve.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mftune.errors import UserError, report  # noqa: E402
from mftune.data.sample import DEMO_VOCAB_SIZE, SAMPLE_ALPACA_PATH, train_sample_tokenizer  # noqa: E402
from mftune.trainer.monitor import plot_loss_curve, read_losses  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "llama2", "lora_llama2_demo.yaml")
VOCAB_SIZE = DEMO_VOCAB_SIZE  # must equal model.model_config.vocab_size in CONFIG
SEQ_LENGTH = 96  # must equal model.model_config.seq_length in CONFIG


def run(step: str, args: list[str]) -> None:
    print(f"\n==> {step}\n    $ python {' '.join(os.path.relpath(a, ROOT) if a.startswith(ROOT) else a for a in args)}",
          flush=True)
    result = subprocess.run([sys.executable, *args], cwd=ROOT)
    if result.returncode:
        sys.exit(f"demo: step '{step}' failed with exit status {result.returncode}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "demo_output"))
    parser.add_argument("--train_epochs", type=int, default=1, help="epochs of base-model training")
    parser.add_argument("--lora_epochs", type=int, default=2, help="epochs of LoRA fine-tuning")
    args = parser.parse_args()
    out = os.path.abspath(args.output_dir)
    data_dir = os.path.join(out, "data")
    os.makedirs(data_dir, exist_ok=True)
    start = time.time()

    conv = os.path.join(data_dir, "alpaca-data-conversation.json")
    run("1/5 convert alpaca data", [os.path.join(ROOT, "scripts", "alpaca_converter.py"),
                                    "--data_path", SAMPLE_ALPACA_PATH, "--output_path", conv])

    print("\n==> 2/5 train a sentencepiece tokenizer", flush=True)
    # Trained on the Vicuna-templated text, so the system prompt costs few tokens.
    tokenizer = train_sample_tokenizer(os.path.join(out, "tokenizer", "tokenizer"), VOCAB_SIZE)
    print(f"    tokenizer: {tokenizer}")

    dataset = os.path.join(data_dir, f"alpaca-demo{SEQ_LENGTH}.mindrecord")
    run("3/5 tokenize", [os.path.join(ROOT, "scripts", "llama_preprocess.py"), "--dataset_type", "qa",
                         "--input_glob", conv, "--model_file", tokenizer,
                         "--seq_length", str(SEQ_LENGTH), "--output_file", dataset])

    train_out, lora_out = os.path.join(out, "train"), os.path.join(out, "finetune")
    common = ["--config", CONFIG, "--use_parallel", "False", "--train_dataset_dir", dataset]
    run("4/5 train the base model (run_mode train)",
        [os.path.join(ROOT, "run_finetune.py"), *common, "--run_mode", "train",
         "--model.model_config.pet_config", "null", "--epochs", str(args.train_epochs), "--output_dir", train_out])
    with open(os.path.join(train_out, "run_summary.json")) as f:
        base_ckpt = json.load(f)["checkpoint"]

    run("5/5 LoRA fine-tune (run_mode finetune)",
        [os.path.join(ROOT, "run_finetune.py"), *common, "--run_mode", "finetune",
         "--epochs", str(args.lora_epochs), "--load_checkpoint", base_ckpt, "--output_dir", lora_out])
    with open(os.path.join(lora_out, "run_summary.json")) as f:
        lora_ckpt = json.load(f)["checkpoint"]

    png = _plot_both(os.path.join(train_out, "metrics.jsonl"),
                     os.path.join(lora_out, "metrics.jsonl"), os.path.join(out, "loss_curve.png"))
    losses = [_losses(os.path.join(d, "metrics.jsonl")) for d in (train_out, lora_out)]
    print(f"\nDemo finished in {time.time() - start:.0f}s.")
    print(f"  base training loss: {losses[0][0]:.3f} -> {losses[0][-1]:.3f}")
    print(f"  LoRA fine-tune loss: {losses[1][0]:.3f} -> {losses[1][-1]:.3f}")
    print(f"  logs:        {train_out}/log/rank_0/info.log, {lora_out}/log/rank_0/info.log")
    print(f"  checkpoints: {base_ckpt}\n               {lora_ckpt}")
    print(f"  metrics:     {train_out}/metrics.jsonl, {lora_out}/metrics.jsonl")
    if png:
        print(f"  loss curve:  {png}")
    return 0


def _losses(path: str) -> list[float]:
    return [loss for _, loss in read_losses(path)]


def _plot_both(train_metrics: str, lora_metrics: str, png: str) -> str | None:
    """Both stages on one axis: the LoRA steps continue after the base model's."""
    train, lora = read_losses(train_metrics), read_losses(lora_metrics)
    offset = train[-1][0] if train else 0
    return plot_loss_curve(png, {"base model (run_mode train)": train,
                                 "LoRA (run_mode finetune)": [(s + offset, l) for s, l in lora]},
                           title="mftune demo: a tiny Llama2 on the bundled alpaca-format data")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (UserError, OSError) as exc:  # e.g. an --output_dir that cannot be created
        sys.exit(report("demo.py", exc))
