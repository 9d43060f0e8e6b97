"""Hugging Face Llama <-> complete mftune checkpoint or MindSpore .ckpt (MindFormers' convert_weight.py).

    python scripts/convert_weight.py --input_path llama-2-7b-hf --output_path llama2_7b.safetensors [--dtype bf16]
    python scripts/convert_weight.py --input_path llama-2-7b-hf --output_path llama2_7b.ckpt  # for MindFormers
    python scripts/convert_weight.py --reversed --input_path llama2_7b.safetensors --output_path llama-2-7b-hf \
        [--max_shard_size 5GB] [--dtype fp16]
    python scripts/convert_weight.py --reversed --input_path llama2_7b.ckpt --output_path llama-2-7b-hf \
        --config configs/llama2/lora_llama2_7b.yaml

Forward: --input_path is a Hugging Face directory (config.json + model.safetensors, sharded safetensors
with model.safetensors.index.json, or pytorch_model*.bin) or a weight file inside one; the output is one
safetensors file with MindFormers names and the model_config in its header. --reversed writes a directory
that transformers' from_pretrained reads, completed from the base's Hugging Face directory (the one the input
records as its origin, e.g. the directory convert_weight.py read, or --base_model_dir / --tokenizer_dir DIR):
its config.json (dtype updated when --dtype casts), generation_config.json, tokenizer files and chat template,
copied byte for byte, so AutoTokenizer and AutoModelForCausalLM load it; what is missing is printed. The output's extension decides its format: .ckpt writes a MindSpore
checkpoint (the same MindFormers names; mindspore.load_checkpoint reads it, no model config inside), anything
else an mftune .safetensors file. --reversed also reads a MindSpore .ckpt (MindFormers' llama2_7b.ckpt), which
records no model config: --config names the YAML whose model.model_config describes it (--config overrides a
file's recorded config too). Tensors are streamed one at a time (peak memory ~ one tensor).
--dtype casts (default: keep the source dtype). --model is accepted for MindFormers compatibility
(llama/llama2 only); MindFormers' other model-specific flags are accepted and ignored.
"""
import argparse
import os
import sys

try:
    import mftune  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm

from mftune.checkpoint.convert import convert_hf_to_mftune, convert_mftune_to_hf, yaml_model_config
from mftune.checkpoint.hf_files import summary
from mftune.errors import CheckpointError, UserError, report
from mftune.log import setup_logging

MODELS = ("llama", "llama2")
IGNORED = ("n_head", "hidden_size", "layers", "is_pretrain", "telechat_type")  # MindFormers, other models


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=str, default="llama", help="model family; only llama (llama2) converts")
    p.add_argument("--input_path", type=str, required=True,
                   help="Hugging Face directory (or a weight file in it); --reversed: mftune .safetensors file")
    p.add_argument("--output_path", type=str, required=True,
                   help="mftune .safetensors or MindSpore .ckpt file; --reversed: Hugging Face directory")
    p.add_argument("--dtype", type=str, default=None, choices=["fp32", "bf16", "fp16"],
                   help="cast floating tensors (default: keep the source dtype)")
    p.add_argument("--reversed", action="store_true", help="mftune complete file -> Hugging Face directory")
    p.add_argument("--max_shard_size", type=str, default="5GB",
                   help="--reversed: largest shard, e.g. 5GB (default), 500MB, or bytes")
    p.add_argument("--config", type=str, default=None,
                   help="--reversed: a YAML whose model.model_config describes the input (needed for a .ckpt)")
    p.add_argument("--base_model_dir", "--tokenizer_dir", dest="base_model_dir", type=str, default=None,
                   help="--reversed: the base's Hugging Face directory to copy config.json, generation_config.json "
                        "and the tokenizer files from (default: the one the input records as its origin)")
    for name in IGNORED:
        p.add_argument(f"--{name}", type=str, default=None, help=argparse.SUPPRESS)
    for name in ("qkv_concat", "is_lora"):  # MindFormers r1.5 options mftune does not implement
        p.add_argument(f"--{name}", type=str, default="False", help=argparse.SUPPRESS)
    return p


def run(args) -> dict:
    if args.model.lower() not in MODELS:
        raise CheckpointError(f"--model={args.model} is invalid: this tool converts Llama checkpoints only. "
                              f"Use --model llama.")
    for name in ("qkv_concat", "is_lora"):
        if getattr(args, name).lower() not in ("false", "0"):
            raise CheckpointError(f"--{name}={getattr(args, name)} is invalid: mftune keeps wq/wk/wv separate and "
                                  f"converts base weights only. Drop --{name} (LoRA: scripts/export_adapter.py).")
    ignored = [f"--{n}" for n in IGNORED if getattr(args, n) is not None]
    if ignored:
        print(f"convert_weight.py: ignoring {', '.join(ignored)} (read from config.json / the checkpoint header)",
              file=sys.stderr)
    progress = lambda it, total: tqdm(it, total=total, unit="tensor", desc="convert", disable=None)  # noqa: E731
    if args.reversed:
        model_config = yaml_model_config(args.config) if args.config else None
        return convert_mftune_to_hf(args.input_path, args.output_path, max_shard_size=args.max_shard_size,
                                    dtype=args.dtype, progress=progress, model_config=model_config,
                                    base_model_dir=args.base_model_dir)
    if args.config:
        print("convert_weight.py: ignoring --config (the model config comes from config.json)", file=sys.stderr)
    if args.base_model_dir:
        print("convert_weight.py: ignoring --base_model_dir (only --reversed writes a Hugging Face directory)",
              file=sys.stderr)
    return convert_hf_to_mftune(args.input_path, args.output_path, dtype=args.dtype, progress=progress)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    try:
        result = run(args)
    except (UserError, OSError) as e:  # OSError: an unreadable input or unwritable output
        return report(parser.prog, e)
    print(f"Converted {result['tensors']} tensors ({result['bytes'] / 2**20:.1f} MiB) in {result['seconds']:.1f} s "
          f"to {result['output']}")
    if result.get("hf_files"):
        print(summary(result["hf_files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
