"""MindFormers YAML + run_mindformer.py CLI -> typed dataclasses.

Schema: reference/mindformers.md §1.1 and §1.5. Every key of the MindFormers LoRA YAML is a
field here; keys with no effect in mftune are listed in ``IGNORED_KEYS`` and reported once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

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
    type: str = "AdamW"  # AdamW | FP32StateAdamWeightDecay (both AdamW, moments in fp32)
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
    lr_end: float = 0.0  # final learning rate (cosine, linear)
    warmup_ratio: float | None = None  # warmup_steps = int(total_steps * warmup_ratio)
    warmup_steps: int = 0  # used when warmup_ratio is None
    warmup_lr_init: float = 0.0  # learning rate at step 0 of the warmup
    total_steps: int = -1  # -1: epochs x optimizer steps per epoch
    num_cycles: float = 0.5  # cosine cycles (0.5 = decay once to lr_end)


@dataclass
class DataLoaderConfig:
    type: str = "MindDataset"  # accepted: a `datasets` save_to_disk directory is read
    dataset_dir: str = ""  # output directory of scripts/llama_preprocess.py
    shuffle: bool = True  # reshuffled every epoch from `seed`
    num_samples: int | None = None  # use only the first N records


@dataclass
class DatasetConfig:
    data_loader: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    input_columns: list[str] = field(default_factory=lambda: ["input_ids", "labels"])
    num_parallel_workers: int = 8  # accepted; the loader runs in-process
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
    use_seq_parallel: bool = False
    micro_batch_num: int = 1  # only meaningful with pipeline_stage > 1
    vocab_emb_dp: bool = True
    gradient_aggregation_group: int = 4  # accepted, unused
    context_parallel: int = 1  # accepted; must be 1


@dataclass
class RecomputeConfig:
    recompute: bool = False  # activation checkpointing per decoder layer
    select_recompute: bool = False
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
    enable_parallel_optimizer: bool = False  # shard weights, grads and optimizer state over data parallel
    strategy_ckpt_save_file: str = "./ckpt_strategy.ckpt"  # accepted; strategy goes to output_dir/strategy
    strategy_ckpt_config: dict[str, Any] = field(default_factory=dict)  # accepted
    parallel_optimizer_config: dict[str, Any] = field(default_factory=dict)  # accepted


@dataclass
class MFConfig:
    """The whole run configuration (one YAML + CLI overrides), validated."""

    seed: int = 0
    output_dir: str = "./output"
    load_checkpoint: str = ""  # complete mftune safetensors file (more formats in later issues)
    src_strategy_path_or_dir: str = ""
    auto_trans_ckpt: bool = False
    only_save_strategy: bool = False
    resume_training: bool | str = False
    transform_process_num: int = 1
    run_mode: RunMode = "finetune"
    use_parallel: bool = False
    do_eval: bool = False
    eval_step_interval: int = -1
    eval_epoch_interval: int = 50
    predict_batch_size: int | None = None
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

    @property
    def pet_config(self) -> dict[str, Any] | None:
        """``model.model_config.pet_config`` (None for full-parameter training)."""
        return self.model.model_config.get("pet_config")

    def callback(self, type_: str) -> CallbackConfig | None:
        """The first callback of this type, or None."""
        return next((c for c in self.callbacks if c.type == type_), None)
