"""Typed configs: strict overlays, clear errors, presets, round trip, fingerprints, docs in sync."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import get_args

import pytest

from configs import (
    CascadeStageConfig,
    ConfigError,
    ModelConfig,
    RunConfig,
    dump_config,
    fingerprint,
    load_config,
    model_config,
)
from configs.reference import field_docs, render, sections
from configs.schema import (
    AttentionBackend,
    LossWeighting,
    Prediction,
    RenderPrecision,
    SamplerName,
    TrainPrecision,
)
from configs.validate import choice_fields, validate
from tests import ROOT


def _yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_overlay_order(tmp_path):
    a = _yaml(tmp_path, "model:\n  depth: 5\n  width: 96\n  heads: 4\ntext:\n  width: 96\n", "a.yaml")
    b = _yaml(tmp_path, "model:\n  depth: 7\n", "b.yaml")
    cfg = load_config([a, b], ["model.text_dim=96", "train.lr=1e-3"])
    assert isinstance(cfg, RunConfig)
    assert (cfg.model.depth, cfg.model.width, cfg.train.lr) == (7, 96, 1e-3)
    assert cfg.data == RunConfig().data  # untouched sections keep the defaults


def test_unknown_key_names_key_file_and_closest(tmp_path):
    path = _yaml(tmp_path, "model:\n  dpeth: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config([path])
    message = str(err.value)
    assert str(path) in message and "'model.dpeth'" in message and "did you mean 'model.depth'" in message
    with pytest.raises(ConfigError, match=r"unknown key 'modle'; did you mean 'model'"):
        load_config(overrides=["modle.depth=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'zzz'$"):
        load_config(overrides=["zzz=1"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("model.width=-8", r"model.width: got -8, expected > 0"),
        ("model.patch_size=[1,3,3]", r"data.height=32 is not divisible by model.patch_size\[1\]=3"),
        (
            "model.attention_backend=flash",
            r"model.attention_backend: unknown value 'flash'; expected one of auto",
        ),
        ("model.depth=abc", r"invalid value for 'model.depth'"),
        ("model.heads=5", r"model.width: 64 is not divisible by model.heads=5"),
        ("parallel.zero_stage=4", r"parallel.zero_stage: got 4"),
        ("diffusion.sampler=euler", r"diffusion.sampler: unknown value 'euler'"),
        ("model.preset=XXL", r"unknown preset 'XXL'"),
        ("text.encoder=t5", r"text.t5_path: required"),
        ("model.depth", r"expected key=value"),
    ],
)
def test_bad_values_fail_at_load_time(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(overrides=[override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "nope.yaml"])
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config([_yaml(tmp_path, "- 1\n- 2\n")])


def test_presets_fill_beneath_explicit_values(tmp_path):
    cfg = load_config(overrides=["model.preset=XL"])
    assert (cfg.model.width, cfg.model.depth, cfg.model.heads) == (1152, 28, 16)
    cfg = load_config([_yaml(tmp_path, "model:\n  depth: 4\n")], ["model.preset=L"])
    assert (cfg.model.width, cfg.model.depth, cfg.model.heads) == (1024, 4, 16)
    assert model_config("S", patch_size=[1, 4, 4]).patch_size == [1, 4, 4]


def test_dump_load_round_trip_and_fingerprint(tmp_path):
    cfg = load_config([ROOT / "configs" / "xl_video.yaml"], ["train.seed=3", "diffusion.eta=0.5"])
    path = tmp_path / "resolved.yaml"
    dump_config(cfg, path)
    again = load_config([path])
    assert again == cfg
    assert fingerprint(again) == fingerprint(cfg)
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=4))
    assert fingerprint(changed) != fingerprint(cfg)
    assert fingerprint(cfg.model) == fingerprint(changed.model)  # sub-configs fingerprint on their own
    assert len(fingerprint(cfg)) == 16


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert isinstance(load_config([path]), RunConfig), path


def test_every_field_documented_and_reference_in_sync():
    for cls in sections():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            assert "\n" not in docs[f.name], f"{cls.__name__}.{f.name}: docstring must be one line"
    assert (ROOT / "docs" / "CONFIG.md").read_text().strip() == render().strip(), (
        "docs/CONFIG.md is stale: run `python -m configs.reference > docs/CONFIG.md`"
    )


@pytest.mark.parametrize("level", [0, 20])
def test_the_zstd_level_is_checked(level):
    with pytest.raises(ConfigError, match=rf"preprocess.compression_level: got {level}, expected 1 to 19"):
        load_config(overrides=["preprocess.compression=zstd", f"preprocess.compression_level={level}"])


def test_text_embeddings_need_the_frozen_t5_encoder():
    with pytest.raises(ValueError, match=r"preprocess.text_embeddings: needs a frozen text encoder.*byte"):
        load_config(overrides=["preprocess.text_embeddings=true"])


# ---------------------------------------------------------------------------------------------------------
# Fields with a fixed set of values
# ---------------------------------------------------------------------------------------------------------


def test_choice_fields_are_literals_listed_once_and_read_back_as_plain_strings(tmp_path):
    fields = {
        f"{section.name}.{name}"
        for section in dataclasses.fields(RunConfig)
        if section.name != "name"
        for name in choice_fields(type(getattr(RunConfig(), section.name)))
    }
    assert fields == {
        "model.kind",
        "model.pos_embed",
        "model.attention_backend",
        "text.encoder",
        "diffusion.prediction",
        "diffusion.loss_weighting",
        "diffusion.sampler",
        "diffusion.guidance_schedule",
        "parallel.precision",
        "render.precision",
        "render.device",
        "preprocess.resize",
        "preprocess.decoder",
        "preprocess.compression",
    }
    assert set(choice_fields(CascadeStageConfig)) == {"kind", "sampler", "guidance_schedule"}
    assert choice_fields(CascadeStageConfig)["kind"] == choice_fields(ModelConfig)["kind"]
    path = _yaml(tmp_path, "model:\n  kind: ssr\nrender:\n  precision: bf16\n")
    cfg = load_config([path], ["diffusion.sampler=dpmpp_2m"])
    values = (cfg.model.kind, cfg.render.precision, cfg.diffusion.sampler)
    assert values == ("ssr", "bf16", "dpmpp_2m") and all(type(v) is str for v in values)
    assert "kind: ssr\n" in dump_config(cfg)


@pytest.mark.parametrize(
    ("layer", "pattern"),
    [
        (
            "render:\n  precision: fp16\n",
            r"render.precision: unknown value 'fp16'; expected one of fp32, bf16$",
        ),
        (
            "model:\n  kind: upscale\n",
            r"model.kind: unknown value 'upscale'; expected one of base, tsr, ssr$",
        ),
        ("text:\n  encoder: clip\n", r"text.encoder: unknown value 'clip'; expected one of byte, t5$"),
    ],
)
def test_a_bad_choice_names_the_file_field_value_and_the_choices(tmp_path, layer, pattern):
    path = _yaml(tmp_path, layer)
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config([path])
    assert str(err.value).startswith(f"{path}: ")


def test_configs_built_in_code_are_checked_against_the_same_choices():
    cfg = RunConfig()
    cfg.parallel.precision = "fp8"
    with pytest.raises(
        ValueError, match=r"^parallel.precision: unknown value 'fp8'; expected one of fp32, bf16, fp16$"
    ):
        validate(cfg)
    with pytest.raises(
        ValueError, match=r"^model.pos_embed: unknown value 'alibi'; expected one of rope, sincos$"
    ):
        validate(ModelConfig(pos_embed="alibi"))


def test_the_models_dispatch_on_the_config_choices():
    """The code that acts on each choice knows exactly the values the config allows."""
    from models.attention import BACKENDS
    from models.diffusion.losses import WEIGHTINGS
    from models.diffusion.samplers import SAMPLER_NAMES
    from models.diffusion.schedules import PREDICTIONS
    from stages.precision import DTYPES

    assert ("auto", *BACKENDS) == get_args(AttentionBackend)
    assert get_args(SamplerName) == SAMPLER_NAMES
    assert get_args(Prediction) == PREDICTIONS
    assert get_args(LossWeighting) == WEIGHTINGS
    assert tuple(DTYPES) == get_args(TrainPrecision)
    assert set(get_args(RenderPrecision)) <= set(DTYPES)


def test_cascade_stages_sample_with_the_diffusion_sections_defaults():
    stage, diffusion = CascadeStageConfig(), RunConfig().diffusion
    shared = ("sampler", "steps", "guidance_scale", "guidance_schedule", "guidance_low", "cond_aug_level")
    assert {name: getattr(stage, name) for name in shared} == {
        name: getattr(diffusion, name) for name in shared
    }
