"""Typed configs: strict overlays, clear errors, presets, round trip, fingerprints, docs in sync."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from configs import ConfigError, RunConfig, dump_config, fingerprint, load_config, model_config
from configs.reference import field_docs, render, sections
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


def test_text_embeddings_need_the_frozen_t5_encoder():
    with pytest.raises(ValueError, match=r"preprocess.text_embeddings: needs a frozen text encoder.*byte"):
        load_config(overrides=["preprocess.text_embeddings=true"])
