"""Merge a LoRA checkpoint into its base weights (MindFormers' mindformers/tools/transform_ckpt_lora.py).

    python scripts/transform_ckpt_lora.py --src_ckpt_path_or_dir output/checkpoint/rank_0/llama2_7b_lora_rank_0-2_60.safetensors \\
        --dst_ckpt_dir merged [--lora_scaling 4] [--base_checkpoint llama2_7b.safetensors] \
        [--output_format mftune|hf|ckpt] [--config lora_llama2_7b.yaml]
    # a MindFormers checkpoint, back to MindFormers: <dst>/merged_lora.ckpt
    python scripts/transform_ckpt_lora.py --src_ckpt_path_or_dir llama2_7b_lora.ckpt --dst_ckpt_dir merged \
        --lora_scaling 1 --output_format ckpt

--src_ckpt_path_or_dir: a complete LoRA checkpoint file, a distributed checkpoint directory (rank_*/ folders,
reassembled directly: no intermediate transform), a PEFT adapter directory, or MindSpore .ckpt checkpoints (a
file, a directory of them, or rank_*/ folders of them with --src_ckpt_strategy, the strategy they were saved
with).
Output: <dst_ckpt_dir>/merged_lora.safetensors (MindFormers: merged_lora.ckpt), a plain model that
run_finetune.py's load_checkpoint and convert_weight.py --reversed read; --output_format hf writes a Hugging
Face directory at <dst_ckpt_dir> instead (model.safetensors, with the config.json, generation_config.json,
tokenizer files and chat template of the base's Hugging Face directory: the one the base records as its origin,
or --base_model_dir / --tokenizer_dir DIR; what is missing is printed), --output_format ckpt (or mindspore)
MindFormers' <dst_ckpt_dir>/merged_lora.ckpt.
mftune additions: --base_checkpoint (default: the base recorded in the LoRA header, whose fingerprint must
match unless --ignore_fingerprint), --output_format, --config (a YAML whose model.model_config describes the
model, for checkpoints that record none: MindSpore's; without it a .ckpt output is merged as MindFormers does,
checking only that each adapter fits its weight). --lora_scaling default: the checkpoint's pet_config
lora_alpha / lora_rank, or lora_alpha / sqrt(lora_rank) with use_rslora (MindFormers' default is 1, which is
rarely right). DoRA adapters (use_dora) merge as m / ||W + dW|| * (W + dW).
--src_ckpt_strategy is used for a MindSpore rank_*/ source and ignored otherwise (mftune's rank files record
their own layout); --dst_ckpt_strategy / --prefix are accepted for MindFormers compatibility and ignored.
Errors: one line on stderr, exit status 2.
"""
import argparse
import os
import sys

try:
    import mftune  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mftune.errors import UserError, report
from mftune.checkpoint.convert import yaml_model_config
from mftune.checkpoint.formats import mindspore_ranks
from mftune.checkpoint.hf_files import summary
from mftune.checkpoint.merge import FORMATS, merge_lora_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src_ckpt_path_or_dir", required=True,
                   help="LoRA checkpoint: complete file, rank_*/ directory or PEFT adapter directory")
    p.add_argument("--dst_ckpt_dir", required=True, help="output directory")
    p.add_argument("--lora_scaling", type=float, default=None,
                   help="scale of B@A (default: pet_config lora_alpha / lora_rank, / sqrt(lora_rank) with "
                        "use_rslora)")
    p.add_argument("--base_checkpoint", default=None,
                   help="base weights (default: the path recorded in the LoRA checkpoint's header)")
    p.add_argument("--ignore_fingerprint", action="store_true",
                   help="merge even if the base differs from the one the LoRA was trained on")
    p.add_argument("--output_format", default="mftune", choices=FORMATS,
                   help="mftune: <dst>/merged_lora.safetensors; hf: a Hugging Face directory at <dst>; "
                        "ckpt / mindspore: <dst>/merged_lora.ckpt")
    p.add_argument("--config", default=None,
                   help="YAML whose model.model_config describes the model (for MindSpore checkpoints)")
    p.add_argument("--base_model_dir", "--tokenizer_dir", dest="base_model_dir", default=None,
                   help="--output_format hf: the base's Hugging Face directory to copy config.json, "
                        "generation_config.json and the tokenizer files from (default: the base's recorded origin)")
    p.add_argument("--src_ckpt_strategy", default="",
                   help="strategy of a MindSpore rank_*/ source; ignored for mftune's (they record their layout)")
    p.add_argument("--dst_ckpt_strategy", default="", help="ignored: the output is a complete checkpoint")
    p.add_argument("--prefix", default="checkpoint_", help="ignored: no intermediate transformed files are written")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    src = args.src_ckpt_path_or_dir
    strategy = args.src_ckpt_strategy if args.src_ckpt_strategy not in ("", "None", None) else ""
    if strategy and not (os.path.isdir(src) and mindspore_ranks.matches(src)):
        print("Note: --src_ckpt_strategy is ignored: mftune checkpoints record their own layout.", file=sys.stderr)
    if args.dst_ckpt_strategy not in ("", "None", None):
        print("Note: --dst_ckpt_strategy is ignored: the output is a complete checkpoint.", file=sys.stderr)
    try:
        result = merge_lora_checkpoint(src, args.dst_ckpt_dir,
                                       base_path=args.base_checkpoint, lora_scaling=args.lora_scaling,
                                       ignore_fingerprint=args.ignore_fingerprint,
                                       output_format=args.output_format, src_strategy=strategy,
                                       model_config=yaml_model_config(args.config) if args.config else None,
                                       base_model_dir=args.base_model_dir)
    except (UserError, OSError) as e:  # OSError: an output path that cannot be written
        return report(parser.prog, e, fold=True)
    print(f"Merged {result['merged']} LoRA weights (scaling {result['scaling']:g}), copied {result['copied']} "
          f"tensors, dropped {result['dropped']} (adapters, optimizer moments, counters)"
          + (f", {len(result['overridden'])} trained tensors taken from the LoRA checkpoint" if result["overridden"]
             else "") + f" -> {result['output']} ({result['seconds']:.1f}s)")
    if result["hf_files"] is not None:
        print(summary(result["hf_files"]))
    elif args.base_model_dir:
        print("Note: --base_model_dir is ignored: only --output_format hf writes a Hugging Face directory.",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
