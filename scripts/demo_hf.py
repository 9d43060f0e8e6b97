#!/usr/bin/env python
"""The Hugging Face path on an embedded default: a Llama 3-style model directory, LoRA, predict, merge.

No hub is reachable, so the demo builds its own tiny random "download" first. Steps (2-4 are the
user-facing commands, run as subprocesses and printed):
  1. build a tiny random Llama 3-style Hugging Face directory (mftune.checkpoint.sample_hf: byte-level
     BPE tokenizer.json trained on the bundled sample, Llama 3 Instruct's chat template, config.json with
     GQA, tied embeddings and llama3 RoPE scaling, random bfloat16 model.safetensors); no transformers
  2. run_finetune.py --run_mode finetune --pretrained_model_dir DIR   LoRA on the bundled alpaca JSON,
     rendered with the directory's chat template (loss on the answers only)
  3. run_finetune.py --run_mode predict --load_checkpoint <finetune>/checkpoint   an answer to one instruction
  4. scripts/transform_ckpt_lora.py --output_format hf   the merged model as a complete Hugging Face directory
then draws the loss curve into <output_dir>/loss_curve.png and prints how to load the merged directory.
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

from mftune.checkpoint.sample_hf import build_sample_hf_dir  # noqa: E402
from mftune.errors import UserError, report  # noqa: E402
from mftune.data.sample import SAMPLE_ALPACA_PATH  # noqa: E402
from mftune.trainer.monitor import plot_loss_curve, read_losses  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "llama3", "lora_pretrained_dir.yaml")
QUESTION = "What is the capital of France?"  # an instruction of the sample's "capital" task
# Overrides of CONFIG (written for a real 1B-8B model) that fit a random 128-wide one: every sample record is
# at most 26 tokens; LoRA on the MLP too and a higher learning rate make the loss fall visibly in 2 epochs.
# predict must apply the same pet_config (target_modules) as the run that trained the adapters.
LORA = ["--model.model_config.pet_config.target_modules", ".*wq|.*wk|.*wv|.*wo|.*w1|.*w2|.*w3"]
TRAIN = ["--model.model_config.seq_length", "32", "--batch_size", "8", "--lr_schedule.learning_rate", "3e-3"]


def run(step: str, args: list[str]) -> None:
    shown = " ".join(_shown(a) for a in args)
    print(f"\n==> {step}\n    $ python {shown}", flush=True)
    start = time.time()
    result = subprocess.run([sys.executable, *args], cwd=ROOT, check=False)
    if result.returncode:
        sys.exit(f"demo_hf: step '{step}' failed with exit status {result.returncode}")
    print(f"    ({time.time() - start:.0f}s)", flush=True)


def _shown(arg: str) -> str:
    """An argument as a user would type it: paths under the checkout relative, shell characters quoted."""
    arg = os.path.relpath(arg, ROOT) if arg.startswith(ROOT) else arg
    return f"'{arg}'" if any(c in arg for c in " |*?\"") else arg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "demo_hf_output"))
    parser.add_argument("--epochs", type=int, default=2, help="epochs of LoRA fine-tuning")
    parser.add_argument("--question", default=QUESTION, help="the instruction step 3 answers")
    args = parser.parse_args()
    out = os.path.abspath(args.output_dir)
    model_dir, lora_out = os.path.join(out, "Llama-3-tiny-random"), os.path.join(out, "finetune")
    predict_out, merged = os.path.join(out, "predict"), os.path.join(out, "merged")
    start = time.time()

    print("\n==> 1/4 build a tiny random Llama 3-style Hugging Face directory", flush=True)
    config = build_sample_hf_dir(model_dir)
    print(f"    {model_dir}: {', '.join(sorted(os.listdir(model_dir)))}\n    {_architecture(config)}\n"
          f"    ({time.time() - start:.0f}s)")

    common = ["--config", CONFIG, "--pretrained_model_dir", model_dir, *LORA]
    run("2/4 LoRA fine-tune (run_mode finetune)",
        [os.path.join(ROOT, "run_finetune.py"), *common, "--run_mode", "finetune", "--train_dataset_dir",
         SAMPLE_ALPACA_PATH, *TRAIN, "--epochs", str(args.epochs), "--output_dir", lora_out])
    checkpoint = os.path.join(lora_out, "checkpoint")
    run("3/4 answer an instruction with the adapters (run_mode predict)",
        [os.path.join(ROOT, "run_finetune.py"), *common, "--run_mode", "predict", "--load_checkpoint", checkpoint,
         "--predict_data", args.question, "--model.model_config.max_decode_length", "64",
         "--output_dir", predict_out])
    run("4/4 merge the adapters into a Hugging Face directory",
        [os.path.join(ROOT, "scripts", "transform_ckpt_lora.py"), "--src_ckpt_path_or_dir", checkpoint,
         "--dst_ckpt_dir", merged, "--output_format", "hf"])

    losses = read_losses(os.path.join(lora_out, "metrics.jsonl"))
    png = plot_loss_curve(os.path.join(out, "loss_curve.png"), {"LoRA (run_mode finetune)": losses},
                          title="mftune demo_hf: LoRA on a tiny random Llama 3-style model")
    _report(time.time() - start, model_dir, lora_out, predict_out, merged, [loss for _, loss in losses], png)
    return 0


def _architecture(config: dict) -> str:
    return (f"{config['num_hidden_layers']} layers, hidden {config['hidden_size']}, {config['num_attention_heads']} "
            f"heads / {config['num_key_value_heads']} kv heads, vocab {config['vocab_size']}, rope_theta "
            f"{config['rope_theta']:g}, rope_scaling {config['rope_scaling']['rope_type']}, "
            f"eos {config['eos_token_id']}, {config['torch_dtype']}")


def _report(seconds: float, model_dir: str, lora_out: str, predict_out: str, merged: str, losses: list[float],
            png: str | None) -> None:
    with open(os.path.join(predict_out, "predict_results.jsonl")) as f:
        answer = json.loads(f.readline())
    print(f"\nDemo finished in {seconds:.0f}s.")
    window = max(1, len(losses) // 10)
    print(f"  LoRA fine-tune loss: {sum(losses[:window]) / window:.3f} -> {sum(losses[-window:]) / window:.3f} "
          f"(mean of the first / last {window} of {len(losses)} steps)")
    print(f"  answer:        {answer['prompt']!r} -> {answer['text']!r}")
    print(f"  model (built): {model_dir}")
    print(f"  fine-tune:     {lora_out}/log/rank_0/info.log, metrics.jsonl, checkpoint/")
    print(f"  predict:       {predict_out}/predict_results.jsonl")
    print(f"  merged model:  {merged}  (Hugging Face directory: weights, config, tokenizer, chat template)")
    if png:
        print(f"  loss curve:    {png}")
    print(f"""
Load the merged directory in transformers:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("{merged}")
    tok = AutoTokenizer.from_pretrained("{merged}")
    ids = tok.apply_chat_template([{{"role": "user", "content": "{QUESTION}"}}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, do_sample=False, max_new_tokens=20)
    print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
or in mftune:
    from mftune import LlamaForCausalLM, apply_chat_template, load_tokenizer
    model, tok = LlamaForCausalLM.from_pretrained("{merged}"), load_tokenizer("{merged}")
    ids = apply_chat_template(tok, [{{"role": "user", "content": "{QUESTION}"}}], add_generation_prompt=True)
    from mftune.generation import generate
    answer = generate(model, [ids], max_new_tokens=20, eos_token_id=tok.stop_token_ids, pad_token_id=tok.pad_token_id)
    print(tok.decode(answer[0]))
The same commands take a downloaded model: --pretrained_model_dir /path/to/Llama-3.2-1B-Instruct.""")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (UserError, OSError) as exc:  # e.g. an --output_dir that cannot be created
        sys.exit(report("demo_hf.py", exc))
