"""Bad numbers, overrides and files: one-line ConfigErrors naming the field, override or file."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import get_args, get_origin, get_type_hints

import pytest

from configs import (
    CascadeConfig,
    ConfigError,
    ModelConfig,
    PipelineConfig,
    RunConfig,
    SynthConfig,
    TextConfig,
    load_cascade,
    load_config,
)
from configs.validate import validate

ONE_STAGE = "stages:\n  - {name: base, kind: base, frames: 4, height: 16, width: 16, fps: 4.0}\n"
"""A valid one-stage cascade file."""


def _float_keys(cls: type, prefix: str = "") -> Iterator[str]:
    """The dotted override key of every float field under the dataclass `cls`, through nested sections,
    one element of a list of sections (index 0) and one entry of a dict of sections (name `a`)."""
    for name, hint in get_type_hints(cls).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            yield from _float_keys(hint, f"{key}.")
        elif get_origin(hint) is list and dataclasses.is_dataclass(get_args(hint)[0]):
            yield from _float_keys(get_args(hint)[0], f"{key}.0.")
        elif get_origin(hint) is dict and dataclasses.is_dataclass(get_args(hint)[1]):
            yield from _float_keys(get_args(hint)[1], f"{key}.a.")
        elif hint is float:
            yield key


SECTION_PREFIX = {ModelConfig: "model.", TextConfig: "text."}
"""A config validated on its own names its fields as in a run config."""

FLOAT_FIELDS = [
    (schema, key)
    for schema in (RunConfig, PipelineConfig, SynthConfig, ModelConfig)
    for key in _float_keys(schema)
]
CASCADE_FLOAT_FIELDS = list(_float_keys(CascadeConfig))


def test_the_walk_reaches_every_kind_of_float_field():
    keys = {key for _, key in FLOAT_FIELDS} | set(CASCADE_FLOAT_FIELDS)
    assert {
        "train.lr",
        "data.fps",
        "model.max_fps",
        "diffusion.logsnr_min",
        "synth.fps",
        "trainings.a.gpus_per_worker",
        "stages.0.fps",
        "stages.0.model.mlp_ratio",
    } <= keys


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize(("schema", "key"), FLOAT_FIELDS, ids=[f"{s.__name__}:{k}" for s, k in FLOAT_FIELDS])
def test_every_float_field_refuses_non_finite_numbers(schema, key, value):
    name = SECTION_PREFIX.get(schema, "") + key
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"{key}={value}"], schema=schema)
    assert str(err.value) == f"{name}: expected a finite number, got {value}"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", CASCADE_FLOAT_FIELDS)
def test_every_cascade_float_field_refuses_non_finite_numbers(tmp_path, key, value):
    path = tmp_path / "cascade.yaml"
    path.write_text(ONE_STAGE)
    name = key.replace("stages.0.", "stages[0].")
    with pytest.raises(ConfigError) as err:
        load_cascade(path, [f"{key}={value}"])
    assert str(err.value) == f"{path}: {name}: expected a finite number, got {value}"


def test_non_finite_numbers_in_files_and_in_code_are_refused_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  fps: .nan\n")
    with pytest.raises(ConfigError, match=r"^data.fps: expected a finite number, got nan$"):
        load_config([path])
    cfg = RunConfig()
    cfg.train.lr = math.inf
    with pytest.raises(ValueError, match=r"^train.lr: expected a finite number, got inf$"):
        validate(cfg)
    with pytest.raises(ValueError, match=r"^model.mlp_ratio: expected a finite number, got -inf$"):
        validate(ModelConfig(mlp_ratio=-math.inf))


# ---------------------------------------------------------------------------------------------------------
# Counts and seeds
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps=0", "train.steps: got 0, expected > 0"),
        ("train.steps=-3", "train.steps: got -3, expected > 0"),
        ("preprocess.decode_threads=0", "preprocess.decode_threads: got 0, expected > 0"),
        ("train.seed=-1", "train.seed: got -1, expected >= 0"),
        ("render.seed=-1", "render.seed: got -1, expected >= 0"),
    ],
)
def test_counts_and_seeds_outside_their_range_name_the_field_and_the_range(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert str(err.value) == message


def test_a_pipelines_render_seed_is_checked():
    with pytest.raises(ConfigError, match=r"^render.seed: got -2, expected >= 0$"):
        load_config(overrides=["render.seed=-2"], schema=PipelineConfig)


# ---------------------------------------------------------------------------------------------------------
# Overrides and files YAML cannot read
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("model.depth=[1,", "did not find expected node content"),
        ("train.lr={", "did not find expected node content"),
        ('name="run', "found unexpected end of stream"),
        ("model.depth=*a", "found undefined alias"),
    ],
)
def test_an_override_yaml_cannot_parse_is_one_line_naming_it(override, problem):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    message = str(err.value)
    value = override.split("=", 1)[1]
    assert message.startswith(f"override '{override}': value {value!r} is not valid YAML: ")
    assert problem in message and "\n" not in message


def test_a_cascade_override_yaml_cannot_parse_is_one_line_naming_it(tmp_path):
    path = tmp_path / "cascade.yaml"
    path.write_text(ONE_STAGE)
    with pytest.raises(ConfigError) as err:
        load_cascade(path, ["stages.0.steps=[2,"])
    message = str(err.value)
    assert message.startswith("override 'stages.0.steps=[2,': value '[2,' is not valid YAML: ")
    assert "\n" not in message


def test_a_file_yaml_cannot_parse_is_one_line_naming_the_file_and_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  depth: 2\n  width: [64,\n")
    with pytest.raises(ConfigError) as err:
        load_config([path])
    message = str(err.value)
    assert message.startswith(f"{path}: not valid YAML at line 4, column 1: ")
    assert "found '<stream end>' (while parsing a flow node)" in message and "\n" not in message


@pytest.mark.parametrize(
    ("text", "kind"), [("false\n", "bool"), ("0\n", "int"), ("hello\n", "str"), ("- 1\n", "list")]
)
def test_a_file_whose_top_level_is_not_a_mapping_names_the_file(tmp_path, text, kind):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config([path])
    assert str(err.value) == f"{path}: expected a mapping of config sections, got {kind}"


def test_an_empty_file_is_an_empty_overlay(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("# nothing set yet\n")
    assert load_config([path]) == RunConfig()


def test_a_file_that_is_not_text_or_is_a_folder_names_the_path(tmp_path):
    binary = tmp_path / "run.yaml"
    binary.write_bytes(b"\xff\xfe model: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config([binary])
    assert str(err.value).startswith(f"{binary}: not UTF-8 text (")
    folder = tmp_path / "configs.yaml"
    folder.mkdir()
    with pytest.raises(ConfigError) as err:
        load_config([folder])
    assert str(err.value) == f"{folder}: is a folder; expected a YAML file"


def test_render_devices_are_checked():
    cfg = load_config(overrides=["render.devices=64", "render.device=cuda"], schema=PipelineConfig)
    assert (cfg.render.devices, cfg.render.device) == (64, "cuda")
    with pytest.raises(ConfigError, match=r"render.devices: got -1, expected an integer >= 0"):
        load_config(overrides=["render.devices=-1"], schema=PipelineConfig)
    with pytest.raises(
        ConfigError, match=r"render.device: unknown value 'tpu'; expected one of auto, cuda, cpu"
    ):
        load_config(overrides=["render.device=tpu"], schema=PipelineConfig)
