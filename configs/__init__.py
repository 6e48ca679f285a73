"""Typed run configuration: schema (dataclasses), strict YAML loading, validation, fingerprints."""

from configs.cascade import (
    check_stage_model,
    load_cascade,
    sampler_settings,
    stage_factor,
    validate_cascade,
)
from configs.loader import ConfigError, dump_config, fingerprint, load_config, model_config, to_dict
from configs.schema import (
    CascadeConfig,
    CascadeStageConfig,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    ParallelConfig,
    PipelineConfig,
    PipelineTrainingConfig,
    PreprocessConfig,
    RenderConfig,
    RunConfig,
    SynthConfig,
    TextConfig,
    TrainConfig,
)

__all__ = [
    "CascadeConfig",
    "CascadeStageConfig",
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "ModelConfig",
    "ParallelConfig",
    "PipelineConfig",
    "PipelineTrainingConfig",
    "PreprocessConfig",
    "RenderConfig",
    "RunConfig",
    "SynthConfig",
    "TextConfig",
    "TrainConfig",
    "check_stage_model",
    "dump_config",
    "fingerprint",
    "load_cascade",
    "load_config",
    "model_config",
    "sampler_settings",
    "stage_factor",
    "to_dict",
    "validate_cascade",
]
