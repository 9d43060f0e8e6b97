"""The MindFormers YAML schema as typed dataclasses (reference/mindformers.md §1.1 and §1.5).

Every key of a MindFormers Llama YAML is a field here (``model.model_config`` keys are
``mftune.models.config.LlamaConfig``'s, ``pet_config`` keys ``mftune.pet.config.LoraConfig``'s); a
field's comment says what it does. A key accepted for MindFormers compatibility with no effect here
is declared with ``ignored(default, why)``: the loader reports it once, docs/config.md lists it. So
adding a key is one field here (plus its line in docs/config.md), and its effect is wherever the
field is read (``grep -rn ".<key>" mftune``).

Loading (``mftune.config.load``) reads the YAML, coerces it into these types
(``mftune.config.coerce``) and checks the values (``mftune.config.checks``).
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from mftune.models.config import LlamaConfig, ignored  # ignored() lives there: LlamaConfig needs it too

RunMode = Literal["train", "finetune", "eval", "predict"]


@dataclass
class TrainerConfig:
    type: str = "CausalLanguageModelingTrainer"  # only causal LM training exists
    model_name: str = ignored("", "MindFormers picks Trainer defaults by name; mftune reads the YAML only")


@dataclass
class RunnerConfig:
    epochs: int = 1  # passes over the training data
    batch_size: int = 1  # samples per data-parallel rank per micro-step
    sink_mode: bool = True  # accepted; mftune steps one batch at a time (docs/config.md)
    sink_size: int = ignored(-1, "one batch per step; see docs/config.md, Sink mode")
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
    python_multiprocessing: bool = ignored(False, "MindSpore dataset workers")
    drop_remainder: bool = True  # drop the last incomplete global batch
    batch_size: int = 1  # overwritten by runner_config.batch_size (as in MindFormers)
    repeat: int = ignored(1, "MindSpore dataset repeat")
    numa_enable: bool = ignored(False, "MindSpore dataset NUMA binding")
    prefetch_size: int = ignored(1, "MindSpore dataset prefetch")
    seed: int | None = ignored(None, "the global `seed` drives shuffling")


@dataclass
class DatasetTaskConfig:
    type: str = "CausalLanguageModelDataset"
    # YAML anchor to the dataset block (finalize makes it that block)
    dataset_config: DatasetConfig | None = field(default=None, metadata={"alias": "the *_dataset block"})


@dataclass
class ParallelConfig:
    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    use_seq_parallel: bool = False  # accepted with a warning: only matters with use_parallel
    micro_batch_num: int = ignored(1, "only meaningful with pipeline_stage > 1")
    vocab_emb_dp: bool = True
    gradient_aggregation_group: int = ignored(4, "MindSpore gradient fusion")
    context_parallel: int = 1  # accepted; must be 1


@dataclass
class RecomputeConfig:
    recompute: bool = False  # activation checkpointing of every decoder layer
    select_recompute: bool = False  # treated as recompute (no per-operator selection)
    parallel_optimizer_comm_recompute: bool = ignored(False, "MindSpore communication recompute")
    mp_comm_recompute: bool = ignored(True, "MindSpore communication recompute")
    recompute_slice_activation: bool = ignored(True, "MindSpore activation slicing")


@dataclass
class CallbackConfig:
    """One entry of ``callbacks:``; ``type`` selects a plain function in the trainer."""

    type: str = "MFLossMonitor"  # MFLossMonitor | CheckpointMonitor | ObsMonitor (ignored)
    per_print_times: int = 1  # MFLossMonitor: log every N steps
    prefix: str = "CKP"  # CheckpointMonitor: file name prefix
    directory: str | None = None  # CheckpointMonitor: root instead of output_dir
    save_checkpoint_steps: int = 1
    save_checkpoint_seconds: int = ignored(0, "checkpoints are saved by step")
    keep_checkpoint_max: int = 5
    keep_checkpoint_per_n_minutes: int = ignored(0, "retention is by count (keep_checkpoint_max)")
    integrated_save: bool = ignored(False, "shards are never gathered")
    save_network_params: bool = False  # also write full weights (checkpoint_network/)
    save_trainable_params: bool = False  # also write trainable params (checkpoint_trainable/)
    async_save: bool = ignored(False, "saves are synchronous")


@dataclass
class RunnerWrapperConfig:
    type: str = "MFTrainOneStepCell"
    scale_sense: float | dict[str, Any] = 1.0  # static loss scale, or DynamicLossScaleUpdateCell block
    use_clip_grad: bool = True
    max_grad_norm: float = 1.0


@dataclass
class ModelConfig:
    # -> LlamaConfig(**model_config); kept as the YAML's mapping, its keys and values checked against LlamaConfig
    model_config: dict[str, Any] = field(default_factory=dict, metadata={"keys": LlamaConfig})
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
    return_tensors: str = ignored("ms", "tensors are torch")
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class ParallelSettings:
    """The ``parallel:`` block (MindSpore auto-parallel context)."""

    parallel_mode: int = ignored(1, "the layout comes from parallel_config")
    gradients_mean: bool = ignored(False, "gradients are always averaged over data parallel")
    enable_alltoall: bool = ignored(False, "MindSpore all-to-all")
    full_batch: bool = ignored(True, "see docs/config.md for the global-batch rule")
    search_mode: str = ignored("sharding_propagation", "MindSpore auto-parallel search")
    enable_parallel_optimizer: bool = False  # accepted with a warning: only matters with use_parallel
    strategy_ckpt_save_file: str = ignored("./ckpt_strategy.ckpt", "strategies go to output_dir/strategy")
    strategy_ckpt_load_file: str = ignored("", "set by --strategy_load_checkpoint; rank files record their layout")
    strategy_ckpt_config: dict[str, Any] = ignored(dict, "strategies go to output_dir/strategy")
    parallel_optimizer_config: dict[str, Any] = ignored(dict, "FSDP2 has no such settings")


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
    micro_batch_interleave_num: int = ignored(1, "must be 1 (checked)")
    recompute_config: RecomputeConfig = field(default_factory=RecomputeConfig)
    callbacks: list[CallbackConfig] = field(default_factory=list)
    eval_callbacks: list[CallbackConfig] = field(default_factory=list)
    runner_wrapper: RunnerWrapperConfig = field(default_factory=RunnerWrapperConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)
    metric: dict[str, Any] = ignored(lambda: {"type": "PerplexityMetric"}, "metric registry: eval reports perplexity")
    context: dict[str, Any] = ignored(dict, "MindSpore context: graph mode, device memory, graph dumps (Ascend)")
    # Ascend / ModelArts only: accepted and ignored.
    auto_tune: bool = ignored(False, "MindSpore dataset autotune")
    filepath_prefix: str = ignored("./autotune", "MindSpore dataset autotune")
    autotune_per_step: int = ignored(10, "MindSpore dataset autotune")
    profile: bool = ignored(False, "MindSpore profiler")
    profile_start_step: int = ignored(1, "MindSpore profiler")
    profile_stop_step: int = ignored(10, "MindSpore profiler")
    init_start_profile: bool = ignored(False, "MindSpore profiler")
    profile_communication: bool = ignored(False, "MindSpore profiler")
    profile_memory: bool = ignored(True, "MindSpore profiler")
    layer_scale: bool = ignored(False, "not read by MindFormers' LLM trainer either")
    layer_decay: float = ignored(0.65, "not read by MindFormers' LLM trainer either")
    lr_scale_factor: int = ignored(256, "not read by MindFormers' LLM trainer either")
    remote_save_url: str = ignored("", "OBS upload on ModelArts/AICC")

    def callback(self, type_: str) -> CallbackConfig | None:
        """The first callback of this type, or None."""
        return next((c for c in self.callbacks if c.type == type_), None)


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


def keys_of(fld: dataclasses.Field) -> type | None:
    """The dataclass a mapping field's keys are checked against (``model.model_config``: LlamaConfig)."""
    return fld.metadata.get("keys")


def section_type(cls: type, name: str) -> type | tuple[str, type] | None:
    """What field ``name`` of ``cls`` holds when it is a section: a dataclass, ``("list", dataclass)``
    for a list of sections (callbacks), or None for a single value or a free mapping."""
    fld = {f.name: f for f in dataclasses.fields(cls)}[name]
    if keys_of(fld):
        return keys_of(fld)
    tp = type_hints(cls)[name]
    for option in get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,):
        if dataclasses.is_dataclass(option):
            return option
        if get_origin(option) is list and dataclasses.is_dataclass(get_args(option)[0]):
            return ("list", get_args(option)[0])
    return None


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """A schema dataclass's field annotations, resolved (cached)."""
    return typing.get_type_hints(cls)


def ignored_key_patterns(cls: type | None = None, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys declared ``ignored`` (a list's entries as ``*``): the keys docs/config.md lists as
    accepted with no effect. An alias section (``*_dataset_task.dataset_config``) is not repeated."""
    cls = cls or MFConfig
    out: list[str] = []
    for fld in dataclasses.fields(cls):
        key = f"{prefix}{fld.name}"
        section = section_type(cls, fld.name)
        if fld.metadata.get("ignored"):
            out.append(key)
        elif isinstance(section, tuple):
            out += ignored_key_patterns(section[1], f"{key}.*.")
        elif section is not None and not fld.metadata.get("alias"):
            out += ignored_key_patterns(section, f"{key}.")
    return tuple(out)


IGNORED_KEYS: tuple[str, ...] = ignored_key_patterns()
