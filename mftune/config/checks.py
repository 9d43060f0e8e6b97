"""Checks on a built ``MFConfig`` (``mftune.config.load`` runs them after ``mftune.config.coerce``).

Passes, in order: which keys present are ignored (``ignored_keys_present``, on the raw mapping),
values (``check_values``: ranges, choices, unsupported layouts, and the model's own rules from
``mftune.models.config.model_config_errors``), files (``check_files``: paths that must exist), then
MindFormers' rewrites (``finalize``). Each problem is one message
``"<dotted.key>=<value> is invalid: <why>. <fix>"``; the caller raises them together.
"""
from __future__ import annotations

import logging
import os
import typing
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

from mftune.config.coerce import did_you_mean, invalid
from mftune.config.schema import CALLBACK_KEYS, IGNORED_CALLBACK_TYPES, IGNORED_KEYS, MFConfig
from mftune.models.config import LlamaConfig, model_config_errors

logger = logging.getLogger("mftune")

# YAML `type:` values mftune implements, by dotted key (a plain dict to grep, not a registry).
TYPE_CHOICES: dict[str, tuple[str, ...]] = {
    "trainer.type": ("CausalLanguageModelingTrainer",),
    "optimizer.type": ("AdamW", "FP32StateAdamWeightDecay", "AdamWeightDecay"),
    "lr_schedule.type": ("CosineWithWarmUpLR", "LinearWithWarmUpLR", "ConstantWarmUpLR", "constant"),
    "train_dataset.data_loader.type": ("MindDataset",),
    "eval_dataset.data_loader.type": ("MindDataset",),
    "train_dataset_task.type": ("CausalLanguageModelDataset",),
    "eval_dataset_task.type": ("CausalLanguageModelDataset",),
    "runner_wrapper.type": ("MFTrainOneStepCell",),
    "model.model_config.type": ("LlamaConfig",),
    "model.arch.type": ("LlamaForCausalLM",),
    "processor.type": ("LlamaProcessor",),
    "processor.tokenizer.type": ("LlamaTokenizer",),
}


# ----------------------------------------------------------------------------- ignored keys

def _leaves(node: Any, path: tuple = ()) -> typing.Iterator[tuple]:
    if isinstance(node, Mapping) and node:
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list) and node and all(isinstance(v, Mapping) for v in node):
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))
    else:
        yield path


def _display(path: tuple) -> str:
    out = ""
    for seg in path:
        out += f"[{seg}]" if isinstance(seg, int) else (f".{seg}" if out else str(seg))
    return out


def compact(keys: list[str]) -> str:
    """``a.x, a.y, b`` -> ``a.{x, y}, b`` (siblings grouped under their parent, first-seen order)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        parent, dot, leaf = key.rpartition(".")
        groups.setdefault(parent if dot else key, []).append(leaf if dot else "")
    out = []
    for parent, leaves in groups.items():
        if leaves == [""]:
            out.append(parent)
        else:
            out.append(f"{parent}.{leaves[0]}" if len(leaves) == 1 else f"{parent}.{{{', '.join(leaves)}}}")
    return ", ".join(out)


def ignored_keys_present(raw: Mapping) -> list[str]:
    """The keys of ``raw`` that IGNORED_KEYS covers, plus ignored callbacks, in YAML order."""
    patterns = [p.split(".") for p in IGNORED_KEYS]
    found = []
    for path in _leaves(raw):
        if any(len(p) <= len(path) and all(fnmatchcase(str(s), q) for s, q in zip(path, p)) for p in patterns):
            found.append(_display(path))
    for list_key in ("callbacks", "eval_callbacks"):
        entries = raw.get(list_key)
        for i, item in enumerate(entries if isinstance(entries, list) else []):
            if isinstance(item, Mapping) and item.get("type") in IGNORED_CALLBACK_TYPES:
                found.append(f"{list_key}[{i}] ({item['type']})")
    return found


# ----------------------------------------------------------------------------- values

def _get(cfg: Any, dotted: str) -> Any:
    """The value at ``a.b[1].c`` of a config (dataclasses, dicts, lists), None when absent."""
    for seg in dotted.split("."):
        name, _, index = seg.partition("[")
        cfg = cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)
        if index and isinstance(cfg, list):
            cfg = cfg[int(index.rstrip("]"))]
        if cfg is None:
            return None
    return cfg


class _Checker:
    """Collects ``invalid`` messages for rules on values read by dotted key."""

    def __init__(self, cfg: MFConfig, errors: list[str]):
        self.cfg, self.errors = cfg, errors

    def rule(self, key: str, ok: typing.Callable[[Any], bool], why: str, fix: str) -> None:
        value = _get(self.cfg, key)
        if value is not None and not ok(value):
            self.errors.append(invalid(key, value, why, fix))

    def at_least(self, key: str, low: int, fix: str) -> None:
        self.rule(key, lambda v: v >= low, f"must be >= {low}", fix)

    def choice(self, key: str, choices: typing.Sequence[str]) -> None:
        hint = f"Use one of {', '.join(choices)}." if len(choices) > 1 else f"Use {choices[0]}."
        value = _get(self.cfg, key)
        if value is not None and value not in choices:
            self.errors.append(invalid(key, value, f"not a type mftune implements{did_you_mean(value, choices)}",
                                       hint))


def check_values(cfg: MFConfig, errors: list[str]) -> None:
    """Ranges, choices, unsupported layouts and the model's rules, each reported with its key and a fix."""
    c = _Checker(cfg, errors)
    for key, choices in TYPE_CHOICES.items():
        c.choice(key, choices)
    _check_training(c)
    _check_parallel(c, cfg)
    for list_key in ("callbacks", "eval_callbacks"):
        for i, cb in enumerate(getattr(cfg, list_key)):
            if cb.type in CALLBACK_KEYS:
                k = f"{list_key}[{i}]"
                c.rule(f"{k}.per_print_times", lambda v: v >= 1, "must be >= 1", "Use per_print_times: 1 to log every step.")
                c.rule(f"{k}.save_checkpoint_steps", lambda v: v >= 1, "must be >= 1",
                       "Use e.g. save_checkpoint_steps: 100.")
                c.rule(f"{k}.keep_checkpoint_max", lambda v: v >= 1, "must be >= 1",
                       "Use e.g. keep_checkpoint_max: 5.")
    _check_model(c, cfg.model.model_config)


def _check_training(c: _Checker) -> None:
    c.at_least("runner_config.epochs", 1, "Use e.g. --epochs 1.")
    c.at_least("runner_config.batch_size", 1, "Use e.g. --batch_size 1 (sequences per data-parallel rank and micro-step).")
    c.at_least("runner_config.gradient_accumulation_steps", 1, "Use 1 for no accumulation.")
    c.rule("runner_config.sink_size", lambda v: v == -1 or v >= 1, "must be -1 or >= 1", "Use sink_size: -1.")
    for ds in ("train_dataset", "eval_dataset"):
        c.at_least(f"{ds}.batch_size", 1, "Use e.g. batch_size: 1.")
        c.at_least(f"{ds}.data_loader.num_samples", 1, "Remove it to use every record.")
        c.at_least(f"{ds}.num_parallel_workers", 1, "Use e.g. num_parallel_workers: 8.")
    in_01 = (lambda v: 0 <= v < 1)
    c.rule("optimizer.learning_rate", lambda v: v >= 0, "must be >= 0", "Use e.g. learning_rate: 1.e-5.")
    c.rule("optimizer.eps", lambda v: v > 0, "must be > 0", "Use eps: 1.e-8.")
    c.rule("optimizer.beta1", in_01, "must be in [0, 1)", "Use beta1: 0.9.")
    c.rule("optimizer.beta2", in_01, "must be in [0, 1)", "Use beta2: 0.999 (or 0.95).")
    c.rule("optimizer.betas", lambda v: len(v) == 2 and all(in_01(b) for b in v),
           "must be two numbers in [0, 1)", "Use betas: [0.9, 0.999], or beta1/beta2.")
    c.rule("optimizer.weight_decay", lambda v: v >= 0, "must be >= 0", "Use weight_decay: 0.0.")
    c.rule("lr_schedule.learning_rate", lambda v: v >= 0, "must be >= 0", "Use e.g. learning_rate: 1.e-5.")
    c.rule("lr_schedule.lr_end", lambda v: v >= 0, "must be >= 0", "Use lr_end: 0.")
    c.rule("lr_schedule.warmup_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]", "Use e.g. warmup_ratio: 0.03.")
    c.rule("lr_schedule.warmup_steps", lambda v: v >= 0, "must be >= 0", "Use warmup_steps: 0.")
    c.rule("lr_schedule.warmup_lr_init", lambda v: v >= 0, "must be >= 0", "Use warmup_lr_init: 0.")
    c.rule("lr_schedule.total_steps", lambda v: v == -1 or v >= 1, "must be -1 or >= 1",
           "Use total_steps: -1 (epochs x steps per epoch).")
    c.rule("lr_schedule.num_cycles", lambda v: v > 0, "must be > 0", "Use num_cycles: 0.5.")
    c.rule("lr_schedule.decay_steps", lambda v: v >= 1, "must be >= 1 when set",
           "Use e.g. decay_steps: 1000, or remove it (cosine decay over total_steps - warmup_steps).")
    c.rule("runner_wrapper.max_grad_norm", lambda v: v > 0, "must be > 0",
           "Use e.g. max_grad_norm: 1.0, or use_clip_grad: False to disable clipping.")
    c.rule("predict_batch_size", lambda v: v >= 1, "must be >= 1", "Use e.g. --predict_batch_size 1.")
    c.rule("transform_process_num", lambda v: v >= 1, "must be >= 1", "Use transform_process_num: 1.")
    for key in ("eval_step_interval", "eval_epoch_interval"):
        c.rule(key, lambda v: v == -1 or v >= 1, "must be -1 (off) or >= 1", f"Use e.g. {key}: -1.")


def _check_parallel(c: _Checker, cfg: MFConfig) -> None:
    for key in ("data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num", "context_parallel"):
        c.at_least(f"parallel_config.{key}", 1, f"Use e.g. {key}: 1.")
    if cfg.use_parallel:
        c.rule("parallel_config.pipeline_stage", lambda v: v <= 1, "pipeline parallelism is not supported yet",
               "Use pipeline_stage: 1 (with data_parallel x model_parallel = number of processes).")
    c.rule("parallel_config.context_parallel", lambda v: v <= 1, "context parallelism is not supported yet",
           "Use context_parallel: 1.")
    c.rule("micro_batch_interleave_num", lambda v: v == 1, "micro-batch interleaving is not supported yet",
           "Use micro_batch_interleave_num: 1.")


def _check_model(c: _Checker, model_config: dict[str, Any]) -> None:
    """The model's own rules (``model_config_errors``), keyed ``model.model_config.<key>``.

    ``model_config`` holds the keys that passed the type checks; the others take LlamaConfig's
    defaults here, as they would in the model.
    """
    c.errors.extend(f"model.model_config.{e}" for e in model_config_errors(LlamaConfig(**model_config)))


# ----------------------------------------------------------------------------- files

def check_files(cfg: MFConfig, errors: list[str]) -> None:
    """Paths that must exist for this run (relative paths are relative to the working directory)."""
    def must_exist(key: str, flag: str, what: str) -> None:
        path = _get(cfg, key)
        if path and not os.path.exists(path):
            errors.append(invalid(key, path, "no such file or directory", f"Pass {what} with {flag}."))

    must_exist("load_checkpoint", "--load_checkpoint",
               "an existing checkpoint file or directory (see docs/checkpoints.md)")
    must_exist("src_strategy_path_or_dir", "--src_strategy_path_or_dir", "an existing strategy file or directory")
    must_exist("processor.tokenizer.vocab_file", "--processor.tokenizer.vocab_file",
               "the tokenizer's sentencepiece model (tokenizer.model)")
    needs = []
    if cfg.run_mode in ("train", "finetune"):
        needs.append(("train", "train_dataset"))
        if cfg.do_eval:
            needs.append(("eval", "eval_dataset"))
    elif cfg.run_mode == "eval":
        needs.append(("eval", "eval_dataset"))
    for flag, section in needs:
        key = f"{section}.data_loader.dataset_dir"
        if not _get(cfg, key):
            purpose = "evaluation" if flag == "eval" else f"run_mode {cfg.run_mode}"
            errors.append(invalid(key, "", f"{purpose} needs a dataset",
                                  f"Pass --{flag}_dataset_dir DIR (a directory written by scripts/llama_preprocess.py, "
                                  f"or a raw .json / .jsonl / .parquet file with processor.tokenizer.vocab_file set)."))
        else:
            must_exist(key, f"--{flag}_dataset_dir", "a directory written by scripts/llama_preprocess.py or a raw "
                       ".json / .jsonl / .parquet file")


# ----------------------------------------------------------------------------- MindFormers' rewrites

def finalize(cfg: MFConfig) -> None:
    """What MindFormers does to a config after loading (reference/mindformers.md §1.5)."""
    cfg.train_dataset.batch_size = cfg.runner_config.batch_size  # runner_config wins
    cfg.train_dataset.seed = cfg.eval_dataset.seed = cfg.seed  # the global seed drives the data
    cfg.train_dataset_task.dataset_config = cfg.train_dataset  # the task reads the dataset block
    cfg.eval_dataset_task.dataset_config = cfg.eval_dataset
    pc = cfg.parallel_config
    layout = (pc.data_parallel, pc.model_parallel, pc.pipeline_stage, pc.context_parallel)
    if not cfg.use_parallel and layout != (1, 1, 1, 1):
        logger.info("use_parallel is False: parallel_config (data_parallel=%d, model_parallel=%d, "
                    "pipeline_stage=%d, context_parallel=%d) is treated as all 1 (one process)", *layout)
        pc.data_parallel = pc.model_parallel = pc.pipeline_stage = pc.context_parallel = 1
