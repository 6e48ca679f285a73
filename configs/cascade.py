"""Cascade files (`configs/cascade/*.yaml`): strict loading, the shape chain between stages, factors.

A cascade is a base stage (text → video) followed by temporal (TSR) and spatial (SSR) super-resolution
stages; each stage's input is the previous stage's output. Loading is as strict as `configs.loader`'s:
unknown keys and wrong types name the file (or override) and the key, e.g. `stages[2].stpes`.

Relative `checkpoint` paths are kept as written; users of the config (render, plan) resolve them against
the current working directory, so run from the directory the paths were written for (the repository
root for the shipped files).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from configs.loader import ConfigError, check_layer, merge_with_preset, parse_override, read_yaml
from configs.schema import CascadeConfig, CascadeStageConfig, ModelConfig, RunConfig
from configs.validate import (
    check_choices,
    check_finite,
    check_positive,
    check_unit_interval,
    validate_model,
)

# ---------------------------------------------------------------------------------------- loading


def _stage_index(item: str, key: str, count: int) -> int:
    if not key.isdigit() or int(key) >= count:
        raise ConfigError(
            f"override '{item}': no stage '{key}'; expected stages.<index>.<field> with an index in "
            f"0..{count - 1} (the cascade has {count} stages)"
        )
    return int(key)


def load_cascade(path: str | Path, overrides: Sequence[str] = ()) -> CascadeConfig:
    """A cascade from its YAML file plus dotted overrides (`name=x`, `stages.2.steps=16`); validated.

    Each stage is merged onto the `CascadeStageConfig` defaults; a stage's `model.preset` fills
    width/depth/heads beneath its explicit values, as for a run config.
    """
    source = str(path)
    raw = read_yaml(Path(path))
    top_base = OmegaConf.structured(CascadeConfig)
    stage_base = OmegaConf.structured(CascadeStageConfig)

    stages_raw = raw.pop("stages") if "stages" in raw else ListConfig([])
    if not isinstance(stages_raw, ListConfig):
        raise ConfigError(f"{source}: 'stages' must be a list of stage mappings, got {stages_raw!r}")
    check_layer(top_base, raw, source, CascadeConfig)
    top_layers: list[DictConfig] = [raw]
    stage_layers: list[list[DictConfig]] = []
    for i, stage in enumerate(stages_raw):
        if not isinstance(stage, DictConfig):
            raise ConfigError(f"{source}: stages[{i}]: expected a mapping of stage fields, got {stage!r}")
        check_layer(stage_base, stage, source, CascadeStageConfig, key_prefix=f"stages[{i}].")
        stage_layers.append([stage])

    for item in overrides:
        layer = parse_override(item, "stages.1.steps=32")
        per_stage = layer.pop("stages") if "stages" in layer else DictConfig({})
        if not isinstance(per_stage, DictConfig):
            raise ConfigError(
                f"override '{item}': stages cannot be replaced from the command line; "
                "edit the cascade file, or override one field as stages.<index>.<field>=value"
            )
        for key, value in per_stage.items():
            i = _stage_index(item, str(key), len(stage_layers))
            if not isinstance(value, DictConfig):
                raise ConfigError(f"override '{item}': expected stages.{i}.<field>=value")
            check_layer(stage_base, value, f"override '{item}'", CascadeStageConfig, f"stages[{i}].")
            stage_layers[i].append(value)
        check_layer(top_base, layer, f"override '{item}'", CascadeConfig)
        top_layers.append(layer)

    try:
        stages = [
            OmegaConf.to_object(merge_with_preset(stage_base, layers, key_prefix=f"stages[{i}]."))
            for i, layers in enumerate(stage_layers)
        ]
        top = OmegaConf.to_object(OmegaConf.merge(top_base, *top_layers))
        cascade = dataclasses.replace(top, stages=stages)
        validate_cascade(cascade)
    except ValueError as err:  # ConfigError included: name the file
        raise ConfigError(f"{source}: {err}") from None
    return cascade


# ------------------------------------------------------------------------------------- validation


def _validate_stage(i: int, s: CascadeStageConfig) -> None:
    """One stage's own fields (everything but its relation to the previous stage)."""
    at = f"stages[{i}]"
    if not s.name:
        raise ValueError(f"{at}.name: empty; every stage needs a unique name (used in output file names)")
    check_choices(s, at)
    for name in ("frames", "height", "width", "steps"):
        check_positive(f"{at}.{name}", getattr(s, name))
    for name in ("fps", "guidance_scale", "guidance_low"):
        check_positive(f"{at}.{name}", getattr(s, name), allow_zero=True)
    check_unit_interval(f"{at}.cond_aug_level", s.cond_aug_level)
    validate_model(s.model, prefix=f"{at}.model")
    for axis, name in enumerate(("frames", "height", "width")):
        size, patch = getattr(s, name), s.model.patch_size[axis]
        if size % patch:
            raise ValueError(
                f"{at}.{name}={size} (stage '{s.name}') is not divisible by "
                f"{at}.model.patch_size[{axis}]={patch} (the patch {list(s.model.patch_size)} must divide "
                "the stage's output frames × height × width)"
            )


def _multiple(prev: int, cur: int) -> int:
    """k when cur = k·prev with a whole k >= 2, else 0."""
    return cur // prev if cur % prev == 0 and cur // prev >= 2 else 0


def _validate_link(i: int, prev: CascadeStageConfig, cur: CascadeStageConfig) -> None:
    """The shape rule between stage i-1 and stage i; errors name both stages."""
    where = f"stage '{cur.name}' ({cur.kind}, stages[{i}]) after '{prev.name}'"
    if cur.kind == "base":
        raise ValueError(
            f"{where}: only the first stage may be base (text → video); later stages are tsr or ssr"
        )
    if cur.kind == "tsr":
        for name in ("height", "width"):
            a, b = getattr(prev, name), getattr(cur, name)
            if a != b:
                raise ValueError(
                    f"{where}: {name} {a} → {b} changed; a tsr stage keeps height and width "
                    f"(expected {name} {a}) and multiplies frames and fps"
                )
        k = _multiple(prev.frames, cur.frames)
        if not k:
            raise ValueError(
                f"{where}: frames {prev.frames} → {cur.frames} is not a whole-number multiple ≥ 2 "
                f"(expected {2 * prev.frames}, {3 * prev.frames}, …)"
            )
        if not math.isclose(cur.fps, k * prev.fps):
            raise ValueError(
                f"{where}: fps {prev.fps:g} → {cur.fps:g}, but frames grow {k}×; a tsr stage keeps the "
                f"duration (expected fps {k * prev.fps:g})"
            )
        return
    # ssr
    if (prev.frames, prev.fps) != (cur.frames, cur.fps):
        raise ValueError(
            f"{where}: frames/fps {prev.frames}@{prev.fps:g} → {cur.frames}@{cur.fps:g} changed; an ssr "
            f"stage keeps frames and fps (expected {prev.frames}@{prev.fps:g})"
        )
    factors = {}
    for name in ("height", "width"):
        a, b = getattr(prev, name), getattr(cur, name)
        factors[name] = _multiple(a, b)
        if not factors[name]:
            raise ValueError(
                f"{where}: {name} {a} → {b} is not a whole-number multiple ≥ 2 of {a} "
                f"(expected {2 * a}, {3 * a}, …)"
            )
    if factors["height"] != factors["width"]:
        raise ValueError(
            f"{where}: height ×{factors['height']} but width ×{factors['width']}; an ssr stage scales both "
            f"by the same factor (expected {factors['height'] * prev.width} wide or "
            f"{factors['width'] * prev.height} high)"
        )


def validate_cascade(c: CascadeConfig) -> None:
    """Each stage's fields and model, unique names, a base first and only first, and the shape chain:
    tsr ×k multiplies frames and fps by a whole k >= 2 (height and width kept); ssr ×s multiplies height
    and width by the same whole s >= 2 (frames and fps kept); no non-finite float anywhere. ValueError
    naming the stage(s) otherwise."""
    check_finite(c)
    if not c.stages:
        raise ValueError("stages: a cascade needs at least one stage (the base)")
    seen: dict[str, int] = {}
    for i, stage in enumerate(c.stages):
        _validate_stage(i, stage)
        if stage.name in seen:
            raise ValueError(
                f"stages[{i}].name: '{stage.name}' is also the name of stages[{seen[stage.name]}]; "
                "stage names must be unique"
            )
        seen[stage.name] = i
    first = c.stages[0]
    if first.kind != "base":
        bases = [f"'{s.name}' (stages[{i}])" for i, s in enumerate(c.stages) if s.kind == "base"]
        hint = f"; move base stage {bases[0]} first" if bases else "; add a base stage first"
        raise ValueError(f"stages[0] '{first.name}' is {first.kind}: the first stage must be base{hint}")
    for i in range(1, len(c.stages)):
        _validate_link(i, c.stages[i - 1], c.stages[i])


SAMPLER_FIELDS = ("sampler", "steps", "guidance_scale", "guidance_schedule", "guidance_low", "cond_aug_level")
"""A cascade stage's sampler settings: each overrides the `diffusion` field of the same name."""


def sampler_settings(stage: CascadeStageConfig) -> dict[str, Any]:
    """The stage's sampler settings by field name (`SAMPLER_FIELDS`, in that order)."""
    return {name: getattr(stage, name) for name in SAMPLER_FIELDS}


def stage_sampling(stage: CascadeStageConfig, run: RunConfig) -> dict[str, Any]:
    """The sampler settings stage `stage` runs the model of run config `run` with: the stage's, except
    that a progressive-distillation student samples with DDIM at the step count it learned."""
    settings = sampler_settings(stage)
    if run.distill.teacher and run.distill.steps:
        settings.update(sampler="ddim", steps=run.distill.steps)
    return settings


def network_passes(stage: CascadeStageConfig, model: ModelConfig) -> int:
    """Forward passes per sampling step: two under classifier-free guidance (a weight that is not
    constantly 1), one without it or for a guidance-distilled model, which takes the weight as an input."""
    guided = stage.guidance_scale != 1.0 or stage.guidance_schedule == "oscillating"
    return 2 if guided and not model.guidance_range else 1


def stage_factor(prev: CascadeStageConfig | None, cur: CascadeStageConfig) -> int:
    """The super-resolution factor from `prev` to `cur` in a validated cascade: frames ratio for tsr,
    height ratio for ssr, 1 for the base."""
    if cur.kind == "base" or prev is None:
        return 1
    return cur.frames // prev.frames if cur.kind == "tsr" else cur.height // prev.height


def check_stage_model(cascade: CascadeConfig, index: int, model: ModelConfig, where: str) -> None:
    """Raise ConfigError, prefixed by `where`, unless a trained `model` fits stage `index`: the stage's
    kind, the super-resolution factor its shapes imply, and a patch dividing its output."""
    stage = cascade.stages[index]
    prev = cascade.stages[index - 1] if index else None
    if model.kind != stage.kind:
        raise ConfigError(f"{where}: the checkpoint is a {model.kind} model, the stage is kind {stage.kind}")
    factor = stage_factor(prev, stage)
    if prev is not None and model.sr_factor != factor:
        raise ConfigError(
            f"{where}: the checkpoint's model.sr_factor is {model.sr_factor}, but the stage scales "
            f"'{prev.name}' by {factor}"
        )
    for axis, size, patch in zip(
        ("frames", "height", "width"), (stage.frames, stage.height, stage.width), model.patch_size
    ):
        if size % patch:
            raise ConfigError(
                f"{where}: {axis}={size} is not divisible by the model's patch size {model.patch_size}"
            )
