"""Checks on a built ``MFConfig`` (``mftune.config.load`` runs them after ``mftune.config.coerce``).

Passes, in order: which keys present are ignored (``ignored_keys_present``, on the raw mapping),
values (``check_values``: ranges, choices, unsupported layouts, and the model's own rules from
``mftune.models.config.model_config_errors``), files (``check_files``: paths that must exist), then
MindFormers' rewrites (``finalize``). Each problem is one message
``"<dotted.key>=<value> is invalid: <why>. <fix>"``; the caller raises them together.
"""
from __future__ import annotations

import logging
import math
import os
import typing
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

from mftune.config.coerce import did_you_mean, invalid
from mftune.config.schema import (
    CALLBACK_KEYS,
    IGNORED_CALLBACK_TYPES,
    IGNORED_KEYS,
    MFConfig,
)
from mftune.models.config import LlamaConfig, model_config_errors

logger = logging.getLogger("mftune")

# YAML `type:` values mftune implements, by dotted key (a plain dict to grep, not a registry).
TYPE_CHOICES: dict[str, tuple[str, ...]] = {
    "trainer.type": ("CausalLanguageModelingTrainer",),
    "optimizer.type": ("AdamW", "FP32StateAdamWeightDecay", "AdamWeightDecay", "AdamWeightDecayX"),
    "lr_schedule.type": ("CosineWithWarmUpLR", "LinearWithWarmUpLR", "ConstantWarmUpLR", "constant"),
    "train_dataset.data_loader.type": ("MindDataset",),
    "eval_dataset.data_loader.type": ("MindDataset",),
    "train_dataset_task.type": ("CausalLanguageModelDataset",),
    "eval_dataset_task.type": ("CausalLanguageModelDataset",),
    "runner_wrapper.type": ("MFTrainOneStepCell", "MFPipelineWithLossScaleCell"),
    "model.model_config.type": ("LlamaConfig",),
    "model.arch.type": ("LlamaForCausalLM",),
    "processor.type": ("LlamaProcessor",),
    "processor.tokenizer.type": ("LlamaTokenizer", "Llama3Tokenizer", "LlamaTokenizerFast"),
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
        if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison's "not"
            self.errors.append(invalid(key, value, "must be a finite number", fix))
        elif value is not None and not ok(value):
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
    quantized = _check_quantization(cfg, errors)
    for key, choices in TYPE_CHOICES.items():
        if not (quantized and key == "model.arch.type"):
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
    if not _architecture_from_directory(cfg):  # else checked once merged (mftune.checkpoint.pretrained)
        _check_model(c, cfg.model.model_config)


def _architecture_from_directory(cfg: MFConfig) -> bool:
    """Whether a Hugging Face directory will complete model_config (pretrained_model_dir, or a load_checkpoint
    directory with a config.json when not resuming): its rules then hold for the merged keys, not for the
    YAML's keys beside LlamaConfig's defaults."""
    lc = cfg.load_checkpoint
    return bool(cfg.pretrained_model_dir) or (bool(lc) and not cfg.resume_training and
                                             os.path.isfile(os.path.join(lc, "config.json")))


QUANTIZED_ARCH = "ParallelLlamaForCausalLM"  # MindFormers' quantized-inference network


def _check_quantization(cfg: MFConfig, errors: list[str]) -> bool:
    """MindFormers' quantized predict configs (RTN, smooth-quant, PTQ: ``quantization_config``, the
    ``ParallelLlamaForCausalLM`` network) are refused with one message; True when the config is one."""
    model_config = cfg.model.model_config
    key = next((k for k in ("quantization_config", "quant_config") if model_config.get(k)), None)
    if key is None and cfg.model.arch.get("type") != QUANTIZED_ARCH:
        return False
    shown = f"model.model_config.{key}" if key else "model.arch.type"
    value = model_config[key] if key else QUANTIZED_ARCH
    errors.append(invalid(
        shown, value, "quantized inference (MindFormers' RTN / smooth-quant / PTQ through MindSpore Golden Stick, "
        f"run by {QUANTIZED_ARCH}) is not something mftune runs",
        "Remove quantization_config and use model.arch.type: LlamaForCausalLM to predict with the unquantized "
        "weights, or export them (scripts/convert_weight.py --reversed) and quantize the Hugging Face directory "
        "with a PyTorch tool; see docs/migrating-from-mindformers.md."))
    return True


def _check_training(c: _Checker) -> None:
    c.at_least("runner_config.epochs", 1, "Use e.g. --epochs 1.")
    c.at_least("runner_config.batch_size", 1, "Use e.g. --batch_size 1 (sequences per data-parallel rank and micro-step).")
    c.at_least("runner_config.gradient_accumulation_steps", 1, "Use 1 for no accumulation.")
    c.rule("runner_config.sink_size", lambda v: v == -1 or v >= 1, "must be -1 or >= 1", "Use sink_size: -1.")
    for ds in ("train_dataset", "eval_dataset"):
        c.at_least(f"{ds}.batch_size", 1, "Use e.g. batch_size: 1.")
        c.at_least(f"{ds}.data_loader.num_samples", 1, "Remove it to use every record.")
        c.at_least(f"{ds}.num_parallel_workers", 1, "Use e.g. num_parallel_workers: 8.")
        c.at_least(f"{ds}.repeat", 1, "Use repeat: 1 (each record once per epoch).")
        c.rule(f"{ds}.max_skipped_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]",
               "Use e.g. max_skipped_ratio: 0.01 (0: no malformed record; 1: keep every valid one).")
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
    c.rule("modal_type", lambda v: all(m == "text" for m in ([v] if isinstance(v, str) else v)),
           "Llama is a text model", "Remove --modal_type (or pass text).")
    c.rule("predict_batch_size", lambda v: v >= 1, "must be >= 1", "Use e.g. --predict_batch_size 1.")
    c.rule("transform_process_num", lambda v: v >= 1, "must be >= 1", "Use transform_process_num: 1.")
    for key in ("eval_step_interval", "eval_epoch_interval"):
        c.rule(key, lambda v: v == -1 or v >= 1, "must be -1 (off) or >= 1", f"Use e.g. {key}: -1.")


def _check_parallel(c: _Checker, cfg: MFConfig) -> None:
    for key in ("data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num", "context_parallel"):
        c.at_least(f"parallel_config.{key}", 1, f"Use e.g. {key}: 1.")
    pc = cfg.parallel_config
    if cfg.use_parallel and isinstance(pc.pipeline_stage, int) and pc.pipeline_stage > 1:
        stages = pc.pipeline_stage
        c.rule("parallel_config.micro_batch_num", lambda v: v % stages == 0,
               f"pipeline_stage={stages} runs as data parallel with micro_batch_num / pipeline_stage gradient "
               f"accumulation steps, so micro_batch_num must be a multiple of {stages}",
               f"Use micro_batch_num: {stages * max(1, -(-pc.micro_batch_num // stages))} "
               f"(global batch = batch_size x data_parallel x micro_batch_num), or pipeline_stage: 1.")
    _check_recompute_lists(c, cfg)
    c.rule("parallel_config.expert_parallel", lambda v: v <= 1, "mftune's Llama has no mixture of experts",
           "Use expert_parallel: 1.")
    c.rule("optimizer.loss_scale", lambda v: v == 1, "the optimizer's own gradient divisor is not applied",
           "Use loss_scale: 1.0 and set runner_wrapper.scale_sense for loss scaling.")
    for list_key in ("callbacks", "eval_callbacks"):
        for i, cb in enumerate(getattr(cfg, list_key)):
            c.rule(f"{list_key}[{i}].checkpoint_format", lambda v: v == "safetensors",
                   "mftune saves safetensors checkpoints",
                   "Use checkpoint_format: safetensors; scripts/convert_weight.py --output_path X.ckpt writes a "
                   "MindSpore .ckpt from one.")
            c.rule(f"{list_key}[{i}].enc_key", lambda v: v is None, "encrypted checkpoints are not supported",
                   "Remove enc_key.")
    c.rule("parallel_config.context_parallel", lambda v: v <= 1, "context parallelism is not supported yet",
           "Use context_parallel: 1.")
    c.rule("micro_batch_interleave_num", lambda v: v == 1, "micro-batch interleaving is not supported yet",
           "Use micro_batch_interleave_num: 1.")


def _check_recompute_lists(c: _Checker, cfg: MFConfig) -> None:
    """Per-stage layer counts in recompute_config (MindFormers' LayerSetting): ints >= 0 or bools, one per
    pipeline stage (with use_parallel: parallel_config.pipeline_stage; else every list as long as the
    first); a pattern's value is a bool or such a list. model_config.offset must fit those stages."""
    rc = cfg.recompute_config
    stages = cfg.parallel_config.pipeline_stage if cfg.use_parallel else None
    for key in ("recompute", "select_recompute", "select_recompute_exclude"):
        value = getattr(rc, key)
        lists = [(f"recompute_config.{key}", value)] if isinstance(value, list) else []
        if isinstance(value, dict):
            for pattern, v in value.items():
                if isinstance(v, list):
                    lists.append((f"recompute_config.{key}.{pattern}", v))
                elif not isinstance(v, bool):
                    c.errors.append(invalid(f"recompute_config.{key}.{pattern}", v, "a pattern takes True, False "
                                            "or a list of layer counts per pipeline stage", "Use e.g. True."))
        for shown, counts in lists:
            if counts and all(isinstance(v, str) for v in counts):
                continue  # a list of patterns
            if not counts or not all(isinstance(v, int) and v >= 0 for v in counts):
                c.errors.append(invalid(shown, counts, "expected layer counts (ints >= 0 or bools), one per "
                                        "pipeline stage", "Use e.g. [2, 1] for two stages, or True."))
                continue
            stages = stages or len(counts)
            if len(counts) != stages:
                c.errors.append(invalid(shown, counts, f"one count per pipeline stage is expected ({stages} "
                                        f"stage{'s' if stages > 1 else ''}: parallel_config.pipeline_stage, or "
                                        f"the length of the first list)", f"Give {stages} count(s), or True."))
    if stages is not None:  # without use_parallel and per-stage lists there are no stages to offset
        _check_offset(c, cfg, stages)


def _check_offset(c: _Checker, cfg: MFConfig, stages: int) -> None:
    """model_config.offset: layers added to each pipeline stage (an int for all, or one per stage), summing
    to num_layers % stages, as MindFormers' LayerSetting requires."""
    offset, layers = cfg.model.model_config.get("offset", 0), cfg.model.model_config.get("num_layers", 32)
    if offset in (0, None) or not isinstance(layers, int):
        return
    ok = isinstance(offset, int) or (isinstance(offset, list) and len(offset) == stages
                                      and all(isinstance(v, int) for v in offset))
    total = offset * stages if isinstance(offset, int) else sum(offset) if ok else None
    if not ok or total != layers % stages:
        c.errors.append(invalid("model.model_config.offset", offset, f"the layers added per pipeline stage ({stages} "
                                f"stage(s)) must be an int or one int per stage summing to num_layers % stages = "
                                f"{layers % stages}", "Use offset: 0 (layers split evenly over the stages)."))


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
    directory = cfg.pretrained_model_dir
    if directory and not os.path.isfile(os.path.join(directory, "config.json")):
        why = "it holds no config.json" if os.path.isdir(directory) else "no such directory"
        errors.append(invalid("pretrained_model_dir", directory, why, "Pass a Hugging Face model directory "
                              "(config.json, tokenizer files, *.safetensors) with --pretrained_model_dir."))
    must_exist("src_strategy_path_or_dir", "--src_strategy_path_or_dir", "an existing strategy file or directory")
    must_exist("processor.tokenizer.vocab_file", "--processor.tokenizer.vocab_file",
               "the tokenizer file (tokenizer.model: SentencePiece, or tiktoken for Llama 3; tokenizer.json) or its "
               "Hugging Face directory")
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
                                  f"MindFormers' MindRecord files, or a raw .json / .jsonl / .parquet file with "
                                  f"processor.tokenizer.vocab_file set)."))
        else:
            must_exist(key, f"--{flag}_dataset_dir", "a directory written by scripts/llama_preprocess.py, a "
                       "MindRecord file or directory, or a raw .json / .jsonl / .parquet file")


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
    if pc.pipeline_stage > 1:
        fold_pipeline(cfg)
    if cfg.adapter_id and cfg.run_mode != "predict":  # predict maps it to S-LoRA slots (trainer/predict.py)
        logger.warning("--adapter_id %s is not used: it selects an S-LoRA adapter per prompt in run_mode predict",
                       " ".join([cfg.adapter_id] if isinstance(cfg.adapter_id, str) else cfg.adapter_id))
    if cfg.optimizer.epsilon is not None:
        cfg.optimizer.eps = cfg.optimizer.epsilon


def fold_pipeline(cfg: MFConfig) -> None:
    """``pipeline_stage: P`` runs as data parallel: ``data_parallel x P`` ranks (FSDP2 shards the
    parameters over all of them) and ``micro_batch_num / P`` accumulation steps, so every optimizer
    step sees MindFormers' global batch (``batch_size x data_parallel x micro_batch_num``) on the same
    processes. MindFormers ignores gradient_accumulation_steps with pipeline stages; so does this."""
    pc, runner = cfg.parallel_config, cfg.runner_config
    stages, accumulation = pc.pipeline_stage, pc.micro_batch_num // pc.pipeline_stage
    log = logger.warning if runner.gradient_accumulation_steps != 1 else logger.info
    log("pipeline_stage=%d runs as data parallel: data_parallel %d -> %d, micro_batch_num=%d -> %d "
        "gradient accumulation steps (global batch %d, as MindFormers')%s", stages, pc.data_parallel,
        pc.data_parallel * stages, pc.micro_batch_num, accumulation,
        runner.batch_size * pc.data_parallel * pc.micro_batch_num,
        f"; gradient_accumulation_steps={runner.gradient_accumulation_steps} is not used with "
        f"pipeline stages (as in MindFormers)" if runner.gradient_accumulation_steps != 1 else "")
    pc.data_parallel *= stages
    runner.gradient_accumulation_steps = accumulation
    pc.pipeline_stage, pc.micro_batch_num = 1, 1
