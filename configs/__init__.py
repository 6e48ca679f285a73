"""Typed run configuration: schema (dataclasses), strict YAML loading, validation, fingerprints."""

from configs.loader import ConfigError, dump_config, fingerprint, load_config, model_config, to_dict
from configs.schema import (
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    ParallelConfig,
    PreprocessConfig,
    RenderConfig,
    RunConfig,
    TextConfig,
    TrainConfig,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "ModelConfig",
    "ParallelConfig",
    "PreprocessConfig",
    "RenderConfig",
    "RunConfig",
    "TextConfig",
    "TrainConfig",
    "dump_config",
    "fingerprint",
    "load_config",
    "model_config",
    "to_dict",
]
