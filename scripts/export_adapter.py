"""mftune LoRA checkpoint -> Hugging Face PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

    python scripts/export_adapter.py \\
        --src_checkpoint output/checkpoint/rank_0/llama_7b_lora_rank_0-2_60.safetensors \\
        --output_dir llama2_7b_lora_adapter [--base_model_name_or_path meta-llama/Llama-2-7b-hf] [--overwrite]

Load it with ``PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(<converted base>), output_dir)``, or
``AutoPeftModelForCausalLM.from_pretrained(output_dir)`` when base_model_name_or_path names the base's Hugging Face
directory: its default is the directory the checkpoint's base records as its origin (the one convert_weight.py
read, or the --load_checkpoint / pretrained_model_dir of the run), else the recorded base checkpoint path. The
base's tokenizer files and chat template (--base_model_dir / --tokenizer_dir DIR, default: that directory) are
copied beside the adapter, so AutoTokenizer.from_pretrained(output_dir) works; what is missing is printed.
r, lora_alpha and lora_dropout come from the checkpoint's pet_config header; --lora_rank/--lora_alpha/
--lora_dropout only fill in a value the header does not record. --src_checkpoint may also be a distributed
checkpoint directory (rank_*/ folders): the adapters are reassembled from the ranks' shards; or MindSpore
checkpoints (a .ckpt file or directory; rank_*/ folders of .ckpt files with --src_strategy, the strategy they were
saved with), which record no LoRA settings: pass --lora_rank, --lora_alpha and --lora_dropout (and --num_layers
when the file holds the adapters only and not every layer has them).
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
from mftune.checkpoint.export import export_adapter_dir
from mftune.checkpoint.hf_files import summary
from mftune.checkpoint.formats.peft_adapter import CONFIG_NAME, SAFETENSORS_NAME


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src_checkpoint", required=True,
                        help="a complete mftune LoRA checkpoint (.safetensors written by run_finetune.py --run_mode "
                             "finetune), a rank_*/ directory, or MindSpore .ckpt checkpoints")
    parser.add_argument("--output_dir", required=True, help="the PEFT adapter directory to write")
    parser.add_argument("--base_model_name_or_path", default=None,
                        help="written to adapter_config.json (default: the base checkpoint path in the header, else '')")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    parser.add_argument("--base_model_dir", "--tokenizer_dir", dest="base_model_dir", default=None,
                        help="the base's Hugging Face directory: its tokenizer files are copied beside the adapter "
                             "(default: the base's recorded origin)")
    parser.add_argument("--src_strategy", default="", help="strategy of a MindSpore rank_*/ checkpoint")
    keys = (("lora_rank", int), ("lora_alpha", float), ("lora_dropout", float), ("num_layers", int))
    for key, kind in keys:
        parser.add_argument(f"--{key}", type=kind, default=None,
                            help=f"{key} when the checkpoint does not record it (MindSpore .ckpt files)")
    args = parser.parse_args(argv)
    fallback = {k: getattr(args, k) for k, _ in keys if getattr(args, k) is not None}
    try:
        config, files = export_adapter_dir(args.src_checkpoint, args.output_dir, overwrite=args.overwrite,
                                           base_model_name_or_path=args.base_model_name_or_path,
                                           fallback=fallback, src_strategy=args.src_strategy,
                                           base_model_dir=args.base_model_dir)
    except (UserError, OSError) as e:  # OSError: an output path that cannot be written
        return report(parser.prog, e, fold=True)
    layers = config["layers_to_transform"]
    print(f"Wrote {os.path.join(args.output_dir, CONFIG_NAME)} and {SAFETENSORS_NAME}: r={config['r']}, "
          f"lora_alpha={config['lora_alpha']}, target_modules={config['target_modules']}, "
          f"layers={'all' if layers is None else layers}, base_model_name_or_path="
          f"{config['base_model_name_or_path'] or '(none)'}.")
    print(summary(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
