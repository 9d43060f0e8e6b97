"""Configuration: the MindFormers YAML and run_mindformer.py's command line -> a validated ``MFConfig``.

A one-way chain: ``schema`` (the dataclasses) -> ``coerce`` (raw mapping -> typed, unknown keys and
wrong types) -> ``checks`` (values, files, MindFormers' rewrites) -> ``load`` (YAML, base_config,
overrides) -> ``cli`` (flags and their precedence). Every key is described in docs/config.md.
"""
from mftune.config.load import config_to_dict, load_config, merge_dicts, read_yaml, save_config
from mftune.config.schema import (IGNORED_CALLBACK_TYPES, IGNORED_KEYS, CallbackConfig, DataLoaderConfig,
                                  DatasetConfig, LRScheduleConfig, MFConfig, ModelConfig, OptimizerConfig,
                                  ParallelConfig, ParallelSettings, ProcessorConfig, RecomputeConfig, RunnerConfig,
                                  RunnerWrapperConfig, TokenizerConfig)
from mftune.errors import ConfigError, format_errors

__all__ = ["IGNORED_CALLBACK_TYPES", "IGNORED_KEYS", "CallbackConfig", "ConfigError", "DataLoaderConfig",
           "DatasetConfig", "LRScheduleConfig", "MFConfig", "ModelConfig", "OptimizerConfig", "ParallelConfig",
           "ParallelSettings", "ProcessorConfig", "RecomputeConfig", "RunnerConfig", "RunnerWrapperConfig",
           "TokenizerConfig", "config_to_dict", "format_errors", "load_config", "merge_dicts", "read_yaml",
           "save_config"]
