"""Strict loading of run configs: YAML overlays and dotted overrides merged onto the typed defaults.

Merging is OmegaConf's (structured configs: unknown keys and wrong types are refused); this module only
adds which file a bad key came from, the closest valid key, one-line errors for files and override
values YAML cannot read, size presets, value validation, a YAML dump that loads back identically, and a
stable fingerprint.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from configs.presets import MODEL_PRESETS
from configs.schema import ModelConfig, RunConfig
from configs.validate import check_choice, choice_fields, validate

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file, override or value is invalid; the message names it and what was expected."""


def _closest_key(schema: type, full_key: str) -> str:
    """The valid dotted key nearest to `full_key` (same parent), or '' when nothing is close."""
    parts = full_key.split(".")
    cls, prefix = schema, []
    while len(prefix) < len(parts) - 1:
        part = parts[len(prefix)]
        hint = get_type_hints(cls).get(part)
        if get_origin(hint) is dict and len(prefix) < len(parts) - 2:  # name → dataclass: skip the name
            hint = get_args(hint)[1]
            prefix.append(part)
            part = parts[len(prefix)]
        if not dataclasses.is_dataclass(hint):
            break
        cls = hint
        prefix.append(part)
    names = [f.name for f in dataclasses.fields(cls)]
    match = difflib.get_close_matches(parts[len(prefix)], names, n=1, cutoff=0.5)
    return ".".join([*prefix, match[0]]) if match else ""


def check_layer(base: DictConfig, layer: DictConfig, source: str, schema: type, key_prefix: str = "") -> None:
    """Merge `layer` onto a copy of `base` only to raise a ConfigError naming `source` on a bad key/type.

    `key_prefix` (e.g. "stages[2].") is put before the keys named in errors when `layer` is one element
    of a list in a larger file.
    """
    try:
        OmegaConf.merge(base, layer)
    except ConfigKeyError as err:
        key = err.full_key or str(err.key)
        hint = _closest_key(schema, key)
        suggestion = f"; did you mean '{key_prefix}{hint}'?" if hint else ""
        raise ConfigError(f"{source}: unknown key '{key_prefix}{key}'{suggestion}") from None
    except OmegaConfBaseException as err:
        owner = err.object_type
        choices = choice_fields(owner).get(err.key) if dataclasses.is_dataclass(owner) else None
        if choices is not None:  # a value outside a Literal field's: the validator's message
            try:
                check_choice(f"{key_prefix}{err.full_key}", err.value, choices)
            except ValueError as bad:
                raise ConfigError(f"{source}: {bad}") from None
        first = str(err).splitlines()[0]
        raise ConfigError(f"{source}: invalid value for '{key_prefix}{err.full_key}': {first}") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What YAML could not read, on one line: the problem and the construct it was in."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        return f"{err.problem} ({err.context})" if err.context else err.problem
    return str(err).splitlines()[0]


def _yaml_position(err: yaml.YAMLError) -> str:
    """ " at line L, column C" (1-based) where YAML found the problem, or "" when it does not say."""
    mark = getattr(err, "problem_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _read_text(path: Path) -> str:
    """The file's text; ConfigError naming it when it is a folder, missing, unreadable or not UTF-8."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror})") from None


def read_yaml(path: Path) -> DictConfig:
    """A YAML file's top-level mapping as a DictConfig (an empty file is an empty one); a one-line
    ConfigError naming the file otherwise (with the line and column of a YAML syntax error)."""
    text = _read_text(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML{_yaml_position(err)}: {_yaml_problem(err)}") from None
    if raw is None:  # nothing but comments
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections, got {type(raw).__name__}")
    return OmegaConf.create(raw)


def parse_override(item: str, example: str) -> DictConfig:
    """The dotted `key=value` override `item` as a nested layer; a one-line ConfigError naming it when it
    has no `=` (`example` shows the form) or YAML cannot read its value."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value, e.g. {example}")
    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError as err:
        value = item.split("=", 1)[1]
        raise ConfigError(
            f"override '{item}': value {value!r} is not valid YAML: {_yaml_problem(err)}"
        ) from None


def merge_with_preset(base: DictConfig, layers: Sequence[DictConfig], key_prefix: str = "") -> DictConfig:
    """`layers` (already checked) merged onto `base`; a model `preset` named in any of them fills
    width/depth/heads beneath the explicit values.

    `base` is a structured ModelConfig, or a structured config with a `model` field (a RunConfig, a
    cascade stage); `key_prefix` names where it sits in errors (e.g. "stages[0].").
    """
    merged = OmegaConf.merge(base, *layers)
    nested = "model" in merged
    if not nested and "preset" not in merged:  # a schema without a model (e.g. a PipelineConfig)
        return merged
    preset = merged.model.preset if nested else merged.preset
    if not preset:
        return merged
    if preset not in MODEL_PRESETS:
        raise ConfigError(
            f"{key_prefix}model.preset: unknown preset '{preset}'; expected one of {list(MODEL_PRESETS)}"
        )
    values = MODEL_PRESETS[preset]
    preset_layer = OmegaConf.create({"model": values} if nested else values)
    return OmegaConf.merge(base, preset_layer, *layers)


def load_config(
    paths: Sequence[str | Path] = (), overrides: Sequence[str] = (), schema: type[C] = RunConfig
) -> C:
    """Defaults of `schema`, then each YAML in order, then dotted `key=value` overrides; validated.

    A `preset` (model size) named anywhere fills width/depth/heads beneath the explicit values.
    """
    base = OmegaConf.structured(schema)
    layers: list[DictConfig] = []
    for path in paths:
        layer = read_yaml(Path(path))
        check_layer(base, layer, str(path), schema)
        layers.append(layer)
    for item in overrides:
        layer = parse_override(item, "model.depth=12")
        check_layer(base, layer, f"override '{item}'", schema)
        layers.append(layer)

    cfg = OmegaConf.to_object(merge_with_preset(base, layers))
    try:
        validate(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts/lists (JSON- and YAML-safe)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | Path | None = None) -> str:
    """YAML text of the resolved config (written to `path` when given); `load_config` reads it back equal."""
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    if path is not None:
        Path(path).write_text(text)
    return text


def fingerprint(cfg: Any) -> str:
    """Stable 16-hex-digit hash of a (sub)config's values (a dataclass or a plain dict of values)."""
    values = cfg if isinstance(cfg, dict) else to_dict(cfg)
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def model_config(preset: str = "tiny", **overrides: Any) -> ModelConfig:
    """A validated ModelConfig from a size preset plus field overrides (for code and tests)."""
    dotted = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    return load_config(overrides=[f"preset={preset}", *dotted], schema=ModelConfig)
