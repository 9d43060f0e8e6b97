"""MindFormers YAML + run_mindformer.py CLI -> typed dataclasses.

Schema: reference/mindformers.md §1.1 and §1.5. Every key of the MindFormers LoRA YAML is a
field here; keys with no effect in mftune are listed in ``IGNORED_KEYS`` and reported once.

``load_config(path, overrides)`` reads the YAML with OmegaConf (anchors, ``1e-5`` floats),
merges its ``base_config`` files under it, applies dotted overrides, then
``mftune.config_validate`` turns the raw mapping into an ``MFConfig`` and ``mftune.config_checks``
checks its values, collecting every problem into one ``ConfigError``. OmegaConf's structured
merge is not used for the schema: it stops at the first error and cannot type ``float | dict``
(``runner_wrapper.scale_sense``).
The command line is ``mftune.cli``; every key is described in docs/config.md.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

logger = logging.getLogger("mftune")

RunMode = Literal["train", "finetune", "eval", "predict"]


@dataclass
class TrainerConfig:
    type: str = "CausalLanguageModelingTrainer"  # only causal LM training exists
    model_name: str = ""  # informational (MindFormers uses it to pick defaults)


@dataclass
class RunnerConfig:
    epochs: int = 1  # passes over the training data
    batch_size: int = 1  # samples per data-parallel rank per micro-step
    sink_mode: bool = True  # accepted; mftune steps one batch at a time (docs/config.md)
    sink_size: int = -1  # accepted; see sink_mode
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step


@dataclass
class OptimizerConfig:
    type: str = "AdamW"  # AdamW | FP32StateAdamWeightDecay | AdamWeightDecay (all AdamW; fp32 moments)
    betas: list[float] | None = None  # [beta1, beta2]; overrides beta1/beta2 when given
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    learning_rate: float = 1e-5  # replaced by the schedule when lr_schedule is set
    weight_decay: float = 0.0  # not applied to 1-D parameters and biases


@dataclass
class LRScheduleConfig:
    type: str = "CosineWithWarmUpLR"  # CosineWithWarmUpLR | LinearWithWarmUpLR | ConstantWarmUpLR | constant
    learning_rate: float = 1e-5  # peak learning rate
    lr_end: float = 0.0  # final learning rate of the cosine (LinearWithWarmUpLR decays to 0)
    warmup_ratio: float | None = None  # warmup_steps = int(total_steps * warmup_ratio)
    warmup_steps: int = 0  # used when warmup_ratio is None
    warmup_lr_init: float = 0.0  # learning rate at step 0 of the warmup
    total_steps: int = -1  # -1: epochs x optimizer steps per epoch
    num_cycles: float = 0.5  # cosine cycles (0.5 = decay once to lr_end)
    decay_steps: int | None = None  # cosine: lr_end from this step on; None = never early


@dataclass
class DataLoaderConfig:
    type: str = "MindDataset"  # accepted: a `datasets` save_to_disk directory is read
    dataset_dir: str = ""  # output directory of scripts/llama_preprocess.py
    shuffle: bool = True  # reshuffled every epoch from `seed`
    num_samples: int | None = None  # use only the first N records
    packing: bool = False  # raw data file: several conversations per record (llama_preprocess.py --packing)


@dataclass
class DatasetConfig:
    data_loader: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    input_columns: list[str] = field(default_factory=lambda: ["input_ids", "labels"])  # see docs/config.md
    num_parallel_workers: int = 8  # processes tokenizing a raw data file (one per 5,000 records at most)
    python_multiprocessing: bool = False  # accepted, unused
    drop_remainder: bool = True  # drop the last incomplete global batch
    batch_size: int = 1  # overwritten by runner_config.batch_size (as in MindFormers)
    repeat: int = 1  # accepted, unused
    numa_enable: bool = False  # accepted, unused
    prefetch_size: int = 1  # accepted, unused
    seed: int | None = None  # accepted; the global `seed` drives shuffling


@dataclass
class DatasetTaskConfig:
    type: str = "CausalLanguageModelDataset"
    dataset_config: DatasetConfig | None = None  # YAML anchor to the dataset block


@dataclass
class ParallelConfig:
    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    use_seq_parallel: bool = False  # accepted with a warning: only matters with use_parallel
    micro_batch_num: int = 1  # only meaningful with pipeline_stage > 1
    vocab_emb_dp: bool = True
    gradient_aggregation_group: int = 4  # accepted, unused
    context_parallel: int = 1  # accepted; must be 1


@dataclass
class RecomputeConfig:
    recompute: bool = False  # activation checkpointing of every decoder layer
    select_recompute: bool = False  # treated as recompute (no per-operator selection)
    parallel_optimizer_comm_recompute: bool = False  # accepted, unused
    mp_comm_recompute: bool = True  # accepted, unused
    recompute_slice_activation: bool = True  # accepted, unused


@dataclass
class CallbackConfig:
    """One entry of ``callbacks:``; ``type`` selects a plain function in the trainer."""

    type: str = "MFLossMonitor"  # MFLossMonitor | CheckpointMonitor | ObsMonitor (ignored)
    per_print_times: int = 1  # MFLossMonitor: log every N steps
    prefix: str = "CKP"  # CheckpointMonitor: file name prefix
    directory: str | None = None  # CheckpointMonitor: root instead of output_dir
    save_checkpoint_steps: int = 1
    save_checkpoint_seconds: int = 0  # accepted, unused
    keep_checkpoint_max: int = 5
    keep_checkpoint_per_n_minutes: int = 0  # accepted, unused
    integrated_save: bool = False  # accepted; shards are never gathered
    save_network_params: bool = False  # also write full weights (checkpoint_network/)
    save_trainable_params: bool = False  # also write trainable params (checkpoint_trainable/)
    async_save: bool = False  # accepted; saves are synchronous


@dataclass
class RunnerWrapperConfig:
    type: str = "MFTrainOneStepCell"
    scale_sense: float | dict[str, Any] = 1.0  # static loss scale, or DynamicLossScaleUpdateCell block
    use_clip_grad: bool = True
    max_grad_norm: float = 1.0


@dataclass
class ModelConfig:
    model_config: dict[str, Any] = field(default_factory=dict)  # -> LlamaConfig(**model_config)
    arch: dict[str, Any] = field(default_factory=lambda: {"type": "LlamaForCausalLM"})


@dataclass
class TokenizerConfig:
    type: str = "LlamaTokenizer"
    vocab_file: str | None = None  # sentencepiece model file
    unk_token: str = "<unk>"
    bos_token: str = "<s>"
    eos_token: str = "</s>"
    pad_token: str = "<unk>"


@dataclass
class ProcessorConfig:
    type: str = "LlamaProcessor"
    return_tensors: str = "ms"  # accepted; tensors are torch
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class ParallelSettings:
    """The ``parallel:`` block (MindSpore auto-parallel context)."""

    parallel_mode: int = 1  # accepted; mftune's layout comes from parallel_config
    gradients_mean: bool = False  # accepted; gradients are always averaged over data parallel
    enable_alltoall: bool = False  # accepted, unused
    full_batch: bool = True  # accepted; see docs/config.md for the global-batch rule
    search_mode: str = "sharding_propagation"  # accepted, unused
    enable_parallel_optimizer: bool = False  # accepted with a warning: only matters with use_parallel
    strategy_ckpt_save_file: str = "./ckpt_strategy.ckpt"  # accepted, unused
    strategy_ckpt_load_file: str = ""  # set by --strategy_load_checkpoint; accepted, unused
    strategy_ckpt_config: dict[str, Any] = field(default_factory=dict)  # accepted
    parallel_optimizer_config: dict[str, Any] = field(default_factory=dict)  # accepted


@dataclass
class MFConfig:
    """The whole run configuration (one YAML + CLI overrides), validated."""

    seed: int = 0
    output_dir: str = "./output"
    load_checkpoint: str = ""  # complete file, directory of files, HF dir, PEFT adapter dir, or rank_*/ dir
    src_strategy_path_or_dir: str = ""  # strategy of a distributed load_checkpoint (checked if given)
    auto_trans_ckpt: bool = False  # write load_checkpoint resharded to output_dir/transformed_checkpoint first
    only_save_strategy: bool = False  # write strategy files and exit
    resume_training: bool | str = False  # True, or a checkpoint file name
    transform_process_num: int = 1  # ranks writing the auto_trans_ckpt transform
    run_mode: RunMode = "finetune"
    use_parallel: bool = False  # True: multi-rank (torchrun)
    do_eval: bool = False  # evaluate on eval_dataset during training
    eval_step_interval: int = -1  # read with do_eval
    eval_epoch_interval: int = 50  # read with do_eval
    predict_batch_size: int | None = None
    input_data: str | list[str] | None = None  # predict input, set by --predict_data (MindFormers' name)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    runner_config: RunnerConfig = field(default_factory=RunnerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig | None = field(default_factory=LRScheduleConfig)
    train_dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train_dataset_task: DatasetTaskConfig = field(default_factory=DatasetTaskConfig)
    eval_dataset: DatasetConfig = field(default_factory=DatasetConfig)
    eval_dataset_task: DatasetTaskConfig = field(default_factory=DatasetTaskConfig)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    micro_batch_interleave_num: int = 1  # accepted; must be 1
    recompute_config: RecomputeConfig = field(default_factory=RecomputeConfig)
    callbacks: list[CallbackConfig] = field(default_factory=list)
    eval_callbacks: list[CallbackConfig] = field(default_factory=list)
    runner_wrapper: RunnerWrapperConfig = field(default_factory=RunnerWrapperConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)
    metric: dict[str, Any] = field(default_factory=lambda: {"type": "PerplexityMetric"})
    context: dict[str, Any] = field(default_factory=dict)  # Ascend context: ignored
    # Ascend / ModelArts only: accepted and ignored.
    auto_tune: bool = False
    filepath_prefix: str = "./autotune"
    autotune_per_step: int = 10
    profile: bool = False
    profile_start_step: int = 1
    profile_stop_step: int = 10
    init_start_profile: bool = False
    profile_communication: bool = False
    profile_memory: bool = True
    layer_scale: bool = False
    layer_decay: float = 0.65
    lr_scale_factor: int = 256
    remote_save_url: str = ""

    def callback(self, type_: str) -> CallbackConfig | None:
        """The first callback of this type, or None."""
        return next((c for c in self.callbacks if c.type == type_), None)


# --------------------------------------------------------------------------------------------
# Accepted for MindFormers compatibility, no effect here. A dotted pattern matches that key and
# everything under it; "*" matches one segment (a key or a list index) with fnmatch rules.
# The ones present in a config are logged once per load: "Ignored on this backend (no effect): ...".
IGNORED_KEYS: tuple[str, ...] = (
    "context",  # MindSpore context: graph mode, device memory, graph dumps (Ascend)
    "trainer.model_name",  # MindFormers picks Trainer defaults by name; mftune reads the YAML only
    "remote_save_url",  # OBS upload on ModelArts/AICC
    "auto_tune", "filepath_prefix", "autotune_per_step",  # MindSpore dataset autotune
    "profile", "profile_start_step", "profile_stop_step", "init_start_profile",
    "profile_communication", "profile_memory",  # MindSpore profiler
    "layer_scale", "layer_decay", "lr_scale_factor",  # not read by MindFormers' LLM trainer either
    "metric",  # metric registry (PerplexityMetric, EmF1Metric)
    "micro_batch_interleave_num",  # only 1 is accepted (checked)
    "parallel.parallel_mode", "parallel.gradients_mean", "parallel.enable_alltoall",
    "parallel.full_batch", "parallel.search_mode", "parallel.strategy_ckpt_save_file",
    "parallel.strategy_ckpt_load_file", "parallel.strategy_ckpt_config",
    "parallel.parallel_optimizer_config",
    "parallel_config.micro_batch_num",
    "parallel_config.gradient_aggregation_group",
    "recompute_config.parallel_optimizer_comm_recompute",
    "recompute_config.mp_comm_recompute", "recompute_config.recompute_slice_activation",
    "runner_config.sink_size",  # one batch per step; see docs/config.md "Sink mode"
    "*_dataset.python_multiprocessing", "*_dataset.numa_enable",
    "*_dataset.prefetch_size", "*_dataset.repeat", "*_dataset.seed",
    "processor.return_tensors",
    "*callbacks.*.save_checkpoint_seconds", "*callbacks.*.keep_checkpoint_per_n_minutes",
    "*callbacks.*.integrated_save", "*callbacks.*.async_save",
    "model.model_config.qkv_concat", "model.model_config.offset",
    "model.model_config.block_size", "model.model_config.num_blocks", "model.model_config.is_dynamic",
    "model.model_config.checkpoint_name_or_path",  # weights come from load_checkpoint
)

# MindFormers callbacks accepted and ignored as a whole (their keys are not checked).
IGNORED_CALLBACK_TYPES: tuple[str, ...] = (
    "ObsMonitor", "SummaryMonitor", "ProfileMonitor", "EvalCallBack", "TrainingStateMonitor",
    "ColdHotExpertMonitor",
)

# Callbacks the trainer runs, with the keys each one takes (CallbackConfig holds their union).
CALLBACK_KEYS: dict[str, tuple[str, ...]] = {
    "MFLossMonitor": ("type", "per_print_times"),
    "CheckpointMonitor": ("type", "prefix", "directory", "save_checkpoint_steps", "save_checkpoint_seconds",
                          "keep_checkpoint_max", "keep_checkpoint_per_n_minutes", "integrated_save",
                          "save_network_params", "save_trainable_params", "async_save"),
}
CALLBACK_ALIASES = {"CheckpointMointor": "CheckpointMonitor"}  # the class name in MindFormers v1.1.0


class ConfigError(Exception):
    """Every problem found in a configuration; each one ``"<key>=<value> is invalid: <why>. <fix>"``."""

    def __init__(self, errors: list[str], path: str | None = None):
        self.errors = list(errors)
        self.path = path
        super().__init__(format_errors(self.errors, path))


def format_errors(errors: list[str], path: str | None = None) -> str:
    """``mftune: N configuration error(s) in FILE:`` then one ``  - message`` line per error."""
    where = f" in {path}" if path else ""
    return "\n".join([f"mftune: {len(errors)} configuration error(s){where}:"]
                     + [f"  - {e}" for e in errors])


def load_config(path: str, overrides: dict[str, Any] | None = None, *,
                check_files: bool = True) -> MFConfig:
    """Read ``path`` (and its ``base_config`` files), apply ``overrides``, validate, return the config.

    ``overrides`` maps dotted keys (``"runner_config.epochs"``, ``"callbacks.1.prefix"``) to
    values and is applied in insertion order on top of the YAML (``mftune.cli`` builds it in
    MindFormers' precedence order). Every intermediate key must exist in the schema.
    ``check_files=False`` skips the existence checks (``load_checkpoint``, dataset directories,
    ``vocab_file``), e.g. to validate a shipped YAML without data. Missing keys, and keys set to
    null, take the dataclass defaults. Raises ConfigError listing every problem found.
    """
    from mftune import config_checks as cc
    from mftune import config_validate as cv

    raw = read_yaml(path)
    errors: list[str] = []
    for key, value in (overrides or {}).items():
        cv.apply_override(raw, key, value, errors)
    ignored = cc.ignored_keys_present(raw)
    cfg = cv.build_config(raw, errors)
    cc.check_values(cfg, errors)
    if check_files:
        cc.check_files(cfg, errors)
    if errors:
        raise ConfigError(errors, path)
    cc.finalize(cfg)
    if ignored:
        logger.info("Ignored on this backend (no effect): %s", cc.compact(ignored))
    return cfg


def read_yaml(path: str) -> dict[str, Any]:
    """The YAML at ``path`` as a plain dict, its ``base_config`` files merged underneath.

    ``base_config`` is a path or a list of paths relative to the file that names it; bases are
    merged in order, then the file itself on top, recursively (mappings merge key by key, any
    other value replaces). A file that (indirectly) includes itself is an error.
    """
    return _read_yaml(path, ())


def _read_yaml(path: str, stack: tuple[str, ...]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    real = os.path.realpath(path)
    if real in stack:
        chain = " -> ".join([*stack, real])
        raise ConfigError([f"base_config={path!r} is invalid: it includes itself ({chain}). "
                           f"Remove the cycle from the base_config chain."], stack[0])
    if not os.path.isfile(path):
        key = "base_config" if stack else "config"
        raise ConfigError([f"{key}={path!r} is invalid: no such file. "
                           f"Pass the path of an existing YAML file."], stack[0] if stack else path)
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:  # YAML syntax, duplicate keys, bad interpolation: all user errors
        why = " ".join(str(exc).split())
        raise ConfigError([f"config={path!r} is invalid: it could not be read ({why}). "
                           f"Fix the YAML syntax."], path) from None
    if not data:
        raise ConfigError([f"config={path!r} is invalid: the file is empty. Start from "
                           f"configs/llama2/lora_llama2_7b.yaml (or use base_config: it)."], path)
    if not isinstance(data, dict):
        raise ConfigError([f"config={path!r} is invalid: the top level is not a mapping. "
                           f"Write one 'key: value' per line."], path)
    bases = data.pop("base_config", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError([f"base_config={bases!r} is invalid: expected a path or a list of paths. "
                           f"Write e.g. base_config: ../base.yaml"], path)
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        merged = merge_dicts(merged, _read_yaml(base_path, (*stack, real)))
    return merge_dicts(merged, data)


def merge_dicts(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: mappings merge recursively, any other value (lists too) replaces."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def config_to_dict(cfg: MFConfig) -> dict[str, Any]:
    """The resolved config as plain data (what ``save_config`` writes; ``load_config`` reads it back).

    Each callback keeps only the keys of its type (CALLBACK_KEYS; just ``type`` for ignored ones).
    """
    out = dataclasses.asdict(cfg)
    for list_key in ("callbacks", "eval_callbacks"):
        out[list_key] = [{k: v for k, v in cb.items() if k in CALLBACK_KEYS.get(cb["type"], ("type",))}
                         for cb in out[list_key]]
    return out


def save_config(cfg: MFConfig, path: str) -> None:
    """Write the resolved config as YAML (atomically: a temporary file renamed into place)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".config-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("# Resolved mftune configuration (YAML + command line). Reload it with --config.\n")
            yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False, allow_unicode=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a config is not a secret
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

