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
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step (not with pipeline_stage > 1, as MindFormers)
    initial_epoch: int = ignored(0, "a resumed run starts where its checkpoint says")
    has_trained_epoches: int = ignored(0, "a resumed run starts where its checkpoint says")
    has_trained_steps: int = ignored(0, "a resumed run starts where its checkpoint says")


@dataclass
class OptimizerConfig:
    type: str = "AdamW"  # AdamW | FP32StateAdamWeightDecay | AdamWeightDecay | AdamWeightDecayX (all AdamW)
    betas: list[float] | None = None  # [beta1, beta2]; overrides beta1/beta2 when given
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    epsilon: float | None = None  # the same as eps (MindSpore's name); wins when set
    learning_rate: float = 1e-5  # replaced by the schedule when lr_schedule is set
    weight_decay: float = 0.0  # not applied to 1-D parameters and biases
    loss_scale: float = 1.0  # MindSpore optimizer's gradient divisor: must be 1 (runner_wrapper.scale_sense scales)
    momentum: float = ignored(0.9, "read by MindSpore's Momentum/SGD optimizers, not by AdamW")


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
    # keys of MindFormers' other schedules (PolynomialWithWarmUpLR, CosineAnnealingLR, CosineWithRestartsAndWarmUpLR),
    # which mftune does not implement (lr_schedule.type is checked)
    power: float = ignored(1.0, "PolynomialWithWarmUpLR only")
    base_lr: float = ignored(0.0, "CosineAnnealingLR only")
    eta_min: float = ignored(0.0, "CosineAnnealingLR only")
    t_max: int = ignored(1, "CosineAnnealingLR only")
    decay_ratio: float = ignored(0.0, "MindFormers' WSD-style schedules only")


@dataclass
class DataLoaderConfig:
    type: str = "MindDataset"  # accepted: a `datasets` save_to_disk directory is read
    dataset_dir: str = ""  # output directory of scripts/llama_preprocess.py
    shuffle: bool = True  # reshuffled every epoch from `seed`
    num_samples: int | None = None  # use only the first N records
    packing: bool = False  # raw data file: several conversations per record (llama_preprocess.py --packing)
    num_parallel_workers: int = ignored(8, "MindSpore reader threads; the dataset-level key sets tokenizing processes")
    columns_list: list[str] | None = ignored(None, "the dataset's input_columns are read")
    num_shards: int | None = ignored(None, "each data-parallel rank reads its own rows (docs/config.md)")
    shard_id: int | None = ignored(None, "each data-parallel rank reads its own rows (docs/config.md)")
    sampler: Any = ignored(None, "records are visited in the seeded order of mftune.data.loader")
    cache: Any = ignored(None, "MindSpore dataset cache server")
    padded_sample: Any = ignored(None, "MindSpore distributed padding; see drop_remainder")
    num_padded: int | None = ignored(None, "MindSpore distributed padding; see drop_remainder")


@dataclass
class DatasetConfig:
    data_loader: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    input_columns: list[str] = field(default_factory=lambda: ["input_ids", "labels"])  # see docs/config.md
    num_parallel_workers: int = 8  # processes tokenizing a raw data file (one per 5,000 records at most)
    python_multiprocessing: bool = ignored(False, "MindSpore dataset workers")
    drop_remainder: bool = True  # drop the last incomplete global batch
    batch_size: int = 1  # overwritten by runner_config.batch_size (as in MindFormers)
    repeat: int = 1  # passes over the records per epoch (MindSpore's dataset.repeat), each in its own order
    max_skipped_ratio: float = 0.01  # a raw data file's malformed records (of those read) allowed before the run stops
    output_columns: list[str] | None = ignored(None, "MindSpore dataset map output")
    column_order: list[str] | None = ignored(None, "MindSpore dataset map output")
    max_rowsize: int | None = ignored(None, "MindSpore shared-memory row size")
    offload: bool = ignored(False, "MindSpore dataset offload to the device")
    per_batch_map: Any = ignored(None, "MindSpore batch map function")
    cache: Any = ignored(None, "MindSpore dataset cache server")
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
    # pipeline_stage > 1 runs as data parallel (FSDP2 over data_parallel x pipeline_stage ranks) with
    # micro_batch_num / pipeline_stage accumulation steps: MindFormers' global batch (docs/parallel.md)
    micro_batch_num: int = 1  # pipeline micro-batches per step (with pipeline_stage > 1)
    vocab_emb_dp: bool = True
    gradient_aggregation_group: int = ignored(4, "MindSpore gradient fusion")
    context_parallel: int = 1  # accepted; must be 1
    expert_parallel: int = 1  # accepted; must be 1 (no mixture of experts)
    mem_coeff: float = ignored(0.1, "MindSpore auto-parallel memory cost model")
    optimizer_shard: bool | None = ignored(None, "parallel.enable_parallel_optimizer is read")
    recompute: Any = ignored(None, "MindFormers copies recompute_config here; that one is read")
    select_recompute: Any = ignored(None, "MindFormers copies recompute_config here; that one is read")
    seq_split_num: int = ignored(1, "pipeline sequence splitting: pipeline stages run as data parallel")
    swap: Any = ignored(None, "Ascend host-memory swapping")
    context_parallel_algo: str = ignored("colossalai_cp", "context parallelism (context_parallel must be 1)")
    ulysses_degree_in_cp: int = ignored(1, "context parallelism (context_parallel must be 1)")


@dataclass
class RecomputeConfig:
    recompute: bool | list[int] = False  # whole decoder layers: all, or a count per pipeline stage (recompute.py)
    # bool, a list of layer counts per pipeline stage, or {op pattern: bool or list}: mftune.parallel.recompute
    select_recompute: bool | list[int] | dict[str, Any] = False
    select_recompute_exclude: bool | list[int] | dict[str, Any] = False  # patterns/layers taken out of the above
    select_comm_recompute: bool | list[int] | dict[str, Any] = ignored(
        False, "recomputes MindSpore's communication ops; DTensor's collectives are recomputed with their layer")
    select_comm_recompute_exclude: bool | list[int] | dict[str, Any] = ignored(
        False, "see select_comm_recompute")
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
    checkpoint_format: str = "safetensors"  # mftune writes safetensors; "ckpt" is refused (convert_weight.py writes it)
    remove_redundancy: bool = ignored(False, "each rank writes only its own block of a tensor")
    exception_save: bool = ignored(False, "MindSpore saves on an exception; mftune keeps its last complete save")
    append_info: Any = ignored(None, "epoch and step are always recorded")
    enc_key: Any = None  # encryption: refused when set
    enc_mode: str = ignored("AES-GCM", "read only with enc_key, which is refused")
    saved_network: Any = ignored(None, "set by MindFormers' trainer")
    # MFLossMonitor's arguments that MindFormers' trainer fills from the run; mftune does the same
    learning_rate: Any = ignored(None, "the logged learning rate is the schedule's")
    micro_batch_num: Any = ignored(None, "taken from parallel_config")
    micro_batch_interleave_num: Any = ignored(None, "taken from the top-level key")
    origin_epochs: Any = ignored(None, "taken from runner_config.epochs")
    dataset_size: Any = ignored(None, "taken from the dataset")
    initial_epoch: Any = ignored(None, "taken from the resumed checkpoint")
    initial_step: Any = ignored(None, "taken from the resumed checkpoint")
    global_batch_size: Any = ignored(None, "computed from the layout")
    gradient_accumulation_steps: Any = ignored(None, "taken from runner_config")
    calculate_per_token_loss: Any = ignored(None, "taken from model_config (must be False)")
    check_for_nan_in_loss_and_grad: bool = ignored(False, "a non-finite loss always stops the run with an error")


@dataclass
class RunnerWrapperConfig:
    type: str = "MFTrainOneStepCell"
    scale_sense: float | dict[str, Any] = 1.0  # static loss scale, or DynamicLossScaleUpdateCell block
    use_clip_grad: bool = True
    max_grad_norm: float = 1.0
    enable_check_overflow: bool = ignored(True, "swallowed by MindFormers' MFTrainOneStepCell (**kwargs) too")
    local_norm: bool = ignored(False, "per-parameter gradient norms for MindFormers' monitor")
    micro_batch_num: int | None = ignored(None, "parallel_config.micro_batch_num is read")
    calculate_per_token_loss: bool = ignored(False, "model_config.calculate_per_token_loss is read")
    sens: float | None = ignored(None, "MindSpore's older name; scale_sense is read")


@dataclass
class ModelConfig:
    # -> LlamaConfig(**model_config); kept as the YAML's mapping, its keys and values checked against LlamaConfig
    model_config: dict[str, Any] = field(default_factory=dict, metadata={"keys": LlamaConfig})
    arch: dict[str, Any] = field(default_factory=lambda: {"type": "LlamaForCausalLM"})


@dataclass
class TokenizerConfig:
    # LlamaTokenizer (SentencePiece) | Llama3Tokenizer (tiktoken) | LlamaTokenizerFast (tokenizer.json);
    # None = the kind of vocab_file (a Hugging Face directory: its tokenizer.json, else its tokenizer.model)
    type: str | None = None
    # tokenizer.model (SentencePiece, or tiktoken: Llama3Tokenizer), tokenizer.json (LlamaTokenizerFast), or a
    # Hugging Face model directory holding one of them
    vocab_file: str | None = None
    unk_token: str = "<unk>"
    bos_token: str = "<s>"
    eos_token: str = "</s>"
    pad_token: str = "<unk>"
    # tokenizer arguments MindFormers passes to its tokenizer classes; mftune's data preparation decides
    # bos/eos placement itself (docs/data.md) and records hold seq_length + 1 tokens
    model_max_length: int | None = ignored(None, "records hold seq_length + 1 tokens")
    # predict prompts: bos first? None = the tokenizer's MindFormers default (LlamaTokenizer yes, Llama3Tokenizer
    # no); the data tools place bos/eos as MindFormers' preprocessing does whatever this says
    add_bos_token: bool | None = None
    add_eos_token: bool = ignored(False, "</s> is added where MindFormers' preprocessing adds it")
    legacy: bool = ignored(True, "SentencePiece legacy handling of text after special tokens")
    sp_model_kwargs: dict[str, Any] = ignored(dict, "SentencePiece sampling options")
    clean_up_tokenization_spaces: bool = ignored(False, "decoding keeps the tokenizer's spaces")
    errors: str = ignored("replace", "decoding replaces invalid UTF-8")
    num_reserved_special_tokens: int = ignored(256, "Llama3Tokenizer: Llama 3's special tokens are fixed")
    padding_side: str = ignored("right", "training pads right; predict pads left")
    truncation_side: str = ignored("right", "records are cut at seq_length + 1 tokens")
    # conversation template name (vicuna | llama2 | llama3 | chatml | hf = the tokenizer directory's Jinja
    # chat_template; mftune.data.templates) for raw datasets and predict prompts;
    # None = MindFormers': Vicuna v1.1 training data, prompts as given (docs/data.md); with the tokenizer taken
    # from pretrained_model_dir, hf when that directory has a chat template. raw (predict): prompts as given
    chat_template: str | None = None
    additional_special_tokens: list[str] | None = ignored(None, "special tokens come from the tokenizer file")


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
    auto_pipeline: bool = ignored(False, "automatic pipeline search: pipeline stages run as data parallel")
    device_num: int | None = ignored(None, "the launcher's world size is used")
    global_rank: int | None = ignored(None, "the launcher's rank is used")
    gradient_fp32_sync: bool = ignored(True, "gradients of trainable (float32) parameters are reduced in float32")
    auto_parallel_search_mode: str = ignored("", "MindSpore auto-parallel search")
    parameter_broadcast: bool = ignored(False, "every rank builds identical initial values")
    all_reduce_fusion_config: list[int] | None = ignored(None, "MindSpore gradient fusion")
    comm_fusion: dict[str, Any] | None = ignored(None, "MindSpore communication fusion")
    pipeline_stages: int = ignored(1, "parallel_config.pipeline_stage is read")
    grad_accumulation_step: int = ignored(1, "runner_config.gradient_accumulation_steps is read")
    dataset_strategy: Any = ignored(None, "each data-parallel rank reads its own rows")
    pipeline_config: dict[str, Any] | None = ignored(None, "pipeline stages run as data parallel")


@dataclass
class MFConfig:
    """The whole run configuration (one YAML + CLI overrides), validated."""

    seed: int = 0
    output_dir: str = "./output"
    # a Hugging Face model directory (MindFormers r1.6+): architecture from its config.json, tokenizer and chat
    # template from its files, weights from its safetensors unless load_checkpoint names others
    pretrained_model_dir: str = ""
    load_checkpoint: str = ""  # complete file, directory of files, HF dir, PEFT adapter dir, or rank_*/ dir
    src_strategy_path_or_dir: str = ""  # strategy of a distributed load_checkpoint (checked if given)
    auto_trans_ckpt: bool = False  # write load_checkpoint resharded to output_dir/transformed_checkpoint first
    only_save_strategy: bool = False  # write strategy files and exit
    resume_training: bool | str = False  # True, or a checkpoint file name
    transform_process_num: int = 1  # ranks writing the auto_trans_ckpt transform
    run_mode: RunMode = "finetune"
    use_parallel: bool = False  # True: multi-rank (torchrun)
    max_restarts: int = 0  # launcher: restart a job whose rank died or hung up to N times (docs/parallel.md)
    heartbeat_timeout: int = 600  # launcher: seconds without progress before a rank counts as hung; 0: off
    do_eval: bool = False  # evaluate on eval_dataset during training
    eval_step_interval: int = -1  # read with do_eval
    eval_epoch_interval: int = 50  # read with do_eval
    predict_batch_size: int | None = None
    input_data: str | list[str] | None = None  # predict input, set by --predict_data (MindFormers' name)
    adapter_id: str | list[str] | None = None  # --adapter_id: S-LoRA adapter per prompt (pet_type slora only)
    modal_type: str | list[str] | None = None  # --modal_type: must be text (Llama is a text model)
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
    "MFLossMonitor": ("type", "per_print_times", "learning_rate", "micro_batch_num", "micro_batch_interleave_num",
                      "origin_epochs", "dataset_size", "initial_epoch", "initial_step", "global_batch_size",
                      "gradient_accumulation_steps", "calculate_per_token_loss", "check_for_nan_in_loss_and_grad"),
    "CheckpointMonitor": ("type", "prefix", "directory", "save_checkpoint_steps", "save_checkpoint_seconds",
                          "keep_checkpoint_max", "keep_checkpoint_per_n_minutes", "integrated_save",
                          "save_network_params", "save_trainable_params", "async_save", "checkpoint_format",
                          "remove_redundancy", "exception_save", "append_info", "enc_key", "enc_mode",
                          "saved_network", "global_batch_size"),
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
