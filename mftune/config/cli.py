"""run_mindformer.py's command line: the same flags, ``--options`` and free-form dotted overrides.

Precedence, lowest to highest (MindFormers r1.3.0, reference/mindformers.md §2):

    YAML < group A flags < --options KEY=VALUE ... < group B flags < --a.b.c VALUE / --a.b.c=VALUE

Every flag defaults to None, meaning "keep the YAML value". ``--config`` is looked up in the
working directory first, then in the repository root (the directory of run_finetune.py);
MindFormers looks only next to run_mindformer.py. ``parse_cli`` raises ConfigError for every
mistake it finds (bad str2bool values, unpaired or unknown dotted overrides, and everything
``load_config`` reports); argparse itself exits with status 2 on malformed usage such as
``--epochs two``. Callers print it with ``mftune.errors.report`` and exit 2, as
``check_main`` here (``python -m mftune.cli``) and ``mftune.trainer.main.cli`` do.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

import yaml

from mftune.config.load import config_to_dict, load_config
from mftune.config.schema import MFConfig
from mftune.errors import ConfigError, report

__all__ = ["build_parser", "parse_cli", "parse_value", "check_main", "resolve_config_path"]

logger = logging.getLogger("mftune")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# flag -> the keys it sets, in the order MindFormers applies them.
GROUP_A: dict[str, tuple[str, ...]] = {
    "device_id": ("context.device_id",),
    "device_target": ("context.device_target",),
    "mode": ("context.mode",),
    "run_mode": ("run_mode",),
    "do_eval": ("do_eval",),
    "seed": ("seed",),
    "use_parallel": ("use_parallel",),
    "load_checkpoint": ("load_checkpoint",),
    "pretrained_model_dir": ("pretrained_model_dir",),
    "src_strategy_path_or_dir": ("src_strategy_path_or_dir",),
    "auto_trans_ckpt": ("auto_trans_ckpt",),
    "transform_process_num": ("transform_process_num",),
    "only_save_strategy": ("only_save_strategy",),
    "resume_training": ("resume_training",),
    "strategy_load_checkpoint": ("parallel.strategy_ckpt_load_file",),
    "remote_save_url": ("remote_save_url",),
    "profile": ("profile",),
}
GROUP_B: dict[str, tuple[str, ...]] = {
    "train_dataset_dir": ("train_dataset.data_loader.dataset_dir",),
    "eval_dataset_dir": ("eval_dataset.data_loader.dataset_dir",),
    "predict_data": ("input_data",),
    "predict_batch_size": ("predict_batch_size",),
    "epochs": ("runner_config.epochs",),
    "batch_size": ("runner_config.batch_size",),
    "gradient_accumulation_steps": ("runner_config.gradient_accumulation_steps",),
    "sink_mode": ("runner_config.sink_mode",),
    "num_samples": ("train_dataset.data_loader.num_samples", "eval_dataset.data_loader.num_samples"),
    "output_dir": ("output_dir",),
    "do_sample": ("model.model_config.do_sample",),
    "adapter_id": ("adapter_id",),
    "modal_type": ("modal_type",),
}
BOOL_FLAGS = ("do_eval", "use_parallel", "auto_trans_ckpt", "only_save_strategy", "profile", "sink_mode",
              "do_sample")

_HELP = {
    "config": "YAML config file (looked up in the working directory, then the repository root)",
    "mode": "context.mode (MindSpore graph 0 / pynative 1): accepted, ignored",
    "device_id": "context.device_id: accepted, ignored (pick the GPU with CUDA_VISIBLE_DEVICES)",
    "device_target": "context.device_target: accepted, ignored",
    "run_mode": "train | finetune | eval (perplexity on eval_dataset) | predict (generate for --predict_data)",
    "do_eval": "evaluate during training at eval_step_interval / eval_epoch_interval (true/false)",
    "train_dataset_dir": "train_dataset.data_loader.dataset_dir (prefix --train_dataset also works)",
    "eval_dataset_dir": "eval_dataset.data_loader.dataset_dir",
    "predict_data": "predict input: one text (literal \\n becomes a newline) or several texts",
    "predict_batch_size": "predict_batch_size",
    "load_checkpoint": "weights to start from: a .safetensors file, a directory of them, a Hugging Face or PEFT directory, or a distributed (rank_*/) checkpoint",
    "pretrained_model_dir": "a Hugging Face model directory: architecture from its config.json (YAML architecture "
                            "keys may be left out), tokenizer and chat template from its files, weights from it "
                            "unless --load_checkpoint names others",
    "src_strategy_path_or_dir": "strategy of a distributed load_checkpoint: required for MindSpore .ckpt rank sets (their output/strategy folder or merged file); optional for mftune's (checked against their rank files)",
    "auto_trans_ckpt": "write load_checkpoint resharded to this layout into output_dir/transformed_checkpoint/ and load that (without it a checkpoint is resharded on load)",
    "transform_process_num": "ranks that write the transformed checkpoint (must divide the world size)",
    "only_save_strategy": "write the strategy files (output_dir/strategy/) and exit (true/false)",
    "resume_training": "true (newest common step) or a checkpoint file name: resume the run saved in load_checkpoint",
    "strategy_load_checkpoint": "parallel.strategy_ckpt_load_file: accepted, ignored",
    "remote_save_url": "ModelArts OBS url: accepted, ignored",
    "seed": "global random seed",
    "use_parallel": "run distributed under scripts/launcher.sh (true/false)",
    "profile": "MindSpore profiler: accepted, ignored",
    "options": "KEY=VALUE overrides with dotted keys; lists as a,b or [a,b]",
    "epochs": "runner_config.epochs",
    "batch_size": "runner_config.batch_size (per data-parallel rank and micro-step)",
    "gradient_accumulation_steps": "runner_config.gradient_accumulation_steps",
    "sink_mode": "runner_config.sink_mode (true/false)",
    "num_samples": "use the first N records of the train and eval datasets",
    "output_dir": "output directory",
    "register_path": "accepted for compatibility, unused (mftune has no model registry)",
    "do_sample": "model.model_config.do_sample (true/false)",
    "adapter_id": "predict with pet_type slora: the adapter of every prompt (one name), or of each prompt (one per "
                  "prompt)",
    "modal_type": "predict: the modality of each input (MindFormers' multimodal models); Llama takes text",
}


def build_parser() -> argparse.ArgumentParser:
    """run_mindformer.py's flags, names and types. Booleans stay strings here: parse_cli checks them."""
    parser = argparse.ArgumentParser(
        prog="run_mindformer.py" if sys.argv[0].endswith("run_mindformer.py") else "run_finetune.py",
        description="MindFormers-style Llama2 (LoRA) fine-tuning. Any config key can also be set "
                    "with --a.b.c VALUE or --a.b.c=VALUE (applied last).")
    parser.add_argument("--config", required=True, type=str, help=_HELP["config"])
    int_flags = ("mode", "device_id", "predict_batch_size", "transform_process_num", "seed", "epochs",
                 "batch_size", "gradient_accumulation_steps", "num_samples")
    for name in ("mode", "device_id", "device_target", "run_mode", "do_eval", "train_dataset_dir",
                 "eval_dataset_dir", "predict_data", "predict_batch_size", "load_checkpoint",
                 "pretrained_model_dir", "src_strategy_path_or_dir", "auto_trans_ckpt", "transform_process_num",
                 "only_save_strategy", "resume_training", "strategy_load_checkpoint", "remote_save_url", "seed",
                 "use_parallel", "profile", "options", "epochs", "batch_size", "gradient_accumulation_steps",
                 "sink_mode", "num_samples", "output_dir", "register_path", "do_sample", "adapter_id", "modal_type"):
        kwargs: dict[str, Any] = {"default": None, "help": _HELP[name]}
        kwargs["type"] = int if name in int_flags else str
        if name in ("predict_data", "options", "adapter_id", "modal_type"):
            kwargs["nargs"] = "+"
        if name in BOOL_FLAGS:
            kwargs["metavar"] = "{true,false}"
        parser.add_argument(f"--{name}", **kwargs)
    return parser


def str2bool(flag: str, value: str, errors: list[str]) -> bool | None:
    """MindFormers' str2bool: "true"/"false" in any case; anything else is an error naming the flag."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    errors.append(f"--{flag}={value!r} is invalid: expected true or false (any case). "
                  f"Pass --{flag} True or --{flag} False.")
    return None


def _number(text: str) -> int | float | None:
    """``text`` as an int, else a float, else None."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return None


def parse_value(value: str) -> Any:
    """MindFormers' typing of free-form override values: int, float, True/False, JSON, else the string."""
    if (number := _number(value)) is not None:
        return number
    if value in ("True", "False"):
        return value == "True"
    try:
        return json.loads(value)
    except ValueError:
        return value


def _option_scalar(text: str) -> Any:
    if (number := _number(text)) is not None:
        return number
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return None if text == "None" else text


def _split_top_level(text: str) -> list[str]:
    """Split on the commas that are outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_option_value(text: str) -> Any:
    """``--options`` values (MindFormers ActionDict): ``a,b`` and ``[a,b]`` are lists (nested brackets
    allowed), items typed int, float, true/false (any case), None, else string."""
    text = text.strip("'\"").replace(" ", "")
    if (text.startswith("[") and text.endswith("]")) or (text.startswith("(") and text.endswith(")")):
        inner = text[1:-1]
        return [parse_option_value(p) for p in _split_top_level(inner)] if inner else []
    if "," in text:
        return [parse_option_value(p) for p in _split_top_level(text)]
    return _option_scalar(text)


def _put(overrides: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` last: dict order is the order overrides are applied (the precedence)."""
    overrides.pop(key, None)
    overrides[key] = value


def cli_overrides(args: argparse.Namespace, rest: list[str], errors: list[str]) -> dict[str, Any]:
    """The dotted-key overrides of a command line, in MindFormers' precedence order."""
    overrides: dict[str, Any] = {}

    def flag_value(flag: str) -> Any:
        value = getattr(args, flag)
        if value is None:
            return None
        if flag in BOOL_FLAGS:
            return str2bool(flag, value, errors)
        if flag == "resume_training" and value.lower() in ("true", "false"):
            return value.lower() == "true"  # otherwise: the checkpoint file name (MindFormers r1.5.0)
        if flag in ("train_dataset_dir", "eval_dataset_dir") and value == "":
            return None  # MindFormers applies these only when non-empty
        if flag == "predict_data":
            return value[0].replace(r"\n", "\n") if len(value) == 1 else list(value)
        return value

    for flag, keys in GROUP_A.items():
        if (value := flag_value(flag)) is not None:
            for key in keys:
                _put(overrides, key, value)
    for item in args.options or []:
        key, eq, text = item.partition("=")
        if not eq or not key:
            errors.append(f"--options {item!r} is invalid: expected KEY=VALUE. "
                          f"Write e.g. --options runner_config.epochs=3 optimizer.betas=0.9,0.95")
            continue
        _put(overrides, key, parse_option_value(text))
    for flag, keys in GROUP_B.items():
        if (value := flag_value(flag)) is not None:
            for key in keys:
                _put(overrides, key, value)
    for key, value in free_form_pairs(rest, errors):
        _put(overrides, key, parse_value(value))
    return overrides


def free_form_pairs(rest: list[str], errors: list[str]) -> list[tuple[str, str]]:
    """``--a.b VALUE`` and ``--a.b=VALUE`` items left over by argparse, as (key, value) pairs."""
    pairs = []
    i = 0
    while i < len(rest):
        item = rest[i]
        i += 1
        if not item.startswith("--") or len(item) == 2:
            errors.append(f"{item!r} is invalid: a free-form override must start with --. "
                          f"Write --a.b.c VALUE or --a.b.c=VALUE (e.g. --model.model_config.seq_length 2048).")
        elif "=" in item:
            key, _, value = item.partition("=")
            pairs.append((key[2:], value))
        elif i < len(rest) and not rest[i].startswith("--"):
            pairs.append((item[2:], rest[i]))
            i += 1
        else:
            errors.append(f"{item}=<missing> is invalid: an override needs a value (key/value pairs). "
                          f"Write {item} VALUE or {item}=VALUE.")
    return pairs


def resolve_config_path(path: str) -> str:
    """An absolute path as is; a relative one from the working directory, else the repository root."""
    candidates = [path] if os.path.isabs(path) else [os.path.abspath(path), os.path.join(REPO_ROOT, path)]
    candidates = list(dict.fromkeys(candidates))  # the same directory when run from the repo root
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    where = " or ".join(candidates)
    raise ConfigError([f"--config={path!r} is invalid: no such file ({where}). "
                       f"Pass a YAML file, e.g. --config configs/llama2/lora_llama2_7b.yaml."], path)


def parse_cli(argv: list[str] | None = None, *, check_files: bool = True) -> MFConfig:
    """Parse run_mindformer.py's command line (``sys.argv[1:]`` when None) into a validated config.

    Raises ConfigError listing every problem of the command line and the YAML together.
    ``check_files=False`` skips the existence checks of ``load_config``.
    """
    args, rest = build_parser().parse_known_args(argv)
    errors: list[str] = []
    overrides = cli_overrides(args, rest, errors)
    if args.register_path is not None:
        logger.warning("--register_path=%s is accepted for compatibility and unused: "
                       "mftune has no model registry", args.register_path)
    try:
        path = resolve_config_path(args.config)
        cfg = load_config(path, overrides, check_files=check_files)
    except ConfigError as exc:
        raise ConfigError(errors + exc.errors, exc.path) from None
    if errors:
        raise ConfigError(errors, path)
    return cfg


def check_main(argv: list[str] | None = None) -> int:
    """``python -m mftune.cli --config FILE [flags]``: validate, print the resolved config as YAML.

    Returns 0, or 2 after printing the configuration errors (no traceback).
    """
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s - %(message)s"))
        # INFO and up, plus the DEBUG record that lists every ignored key
        handler.addFilter(lambda r: r.levelno >= logging.INFO or r.getMessage().startswith("Ignored keys: "))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        cfg = parse_cli(argv)
    except ConfigError as exc:
        return report("mftune", exc)
    sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))
    return 0
