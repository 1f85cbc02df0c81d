"""Run configuration: the typed schema (:mod:`.schema`), reading YAML (:mod:`.loading`) and the
rules across keys (:mod:`.validation`). The bottom layer: of sdd_train it imports only
:mod:`sdd_train.exit_codes` (its ConfigError is a UsageError, exit code 2)."""

from sdd_train.config.loading import as_dict, config_from_dict, load_config, save_config, to_yaml
from sdd_train.config.schema import (MODEL_KERNEL_KEYS, CallbackConfig, ConfigError, DataConfig, DatasetConfig,
                                     DiagnosticsConfig, DownstreamConfig, EvalSetConfig, InitConfig,
                                     InstanceFilterConfig, LoggingConfig, MixLNConfig, ModelConfig, MoEConfig,
                                     MuonConfig, OptimConfig, ParallelConfig, ProfileConfig, RunConfig, SpanNormConfig,
                                     SpikeConfig, TrainConfig)
from sdd_train.config.validation import validate

__all__ = ["MODEL_KERNEL_KEYS", "CallbackConfig", "ConfigError", "DataConfig", "DatasetConfig", "DiagnosticsConfig",
           "DownstreamConfig", "EvalSetConfig", "InitConfig", "InstanceFilterConfig", "LoggingConfig", "MixLNConfig",
           "ModelConfig", "MoEConfig", "MuonConfig", "OptimConfig", "ParallelConfig", "ProfileConfig", "RunConfig",
           "SpanNormConfig", "SpikeConfig", "TrainConfig", "as_dict", "config_from_dict", "load_config", "save_config",
           "to_yaml", "validate"]
