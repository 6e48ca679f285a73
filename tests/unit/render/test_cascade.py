"""Cascade configs: strict loading, the shape chain between stages, and the weight-free render plan."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from configs import (
    ConfigError,
    dump_config,
    load_cascade,
    load_config,
    stage_factor,
    validate_cascade,
)
from models.flops import forward_flops, parameter_count
from stages.render import format_cascade_plan, plan_cascade
from tests import ROOT

CASCADES = ROOT / "configs" / "cascade"


def _stage(name: str, kind: str, frames: int, height: int, width: int, fps: float, **extra: Any) -> dict:
    return {
        "name": name,
        "kind": kind,
        "frames": frames,
        "height": height,
        "width": width,
        "fps": fps,
        **extra,
    }


def _write(tmp_path: Path, stages: list[dict], name: str = "cascade.yaml", **top: Any) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"name": "test", **top, "stages": stages}, sort_keys=False))
    return path


BASE = _stage("base", "base", 8, 32, 32, 4.0)


# ------------------------------------------------------------------------------------ shipped files


def test_imagen_video_plan_has_the_papers_seven_shapes():
    rows = plan_cascade(load_cascade(CASCADES / "imagen_video.yaml"))
    shapes = [(r["kind"], r["frames"], r["width"], r["height"], r["fps"]) for r in rows]
    assert shapes == [  # (kind, frames, width, height, fps) as in the paper's figure
        ("base", 16, 40, 24, 3.0),
        ("tsr", 32, 40, 24, 6.0),
        ("ssr", 32, 80, 48, 6.0),
        ("ssr", 32, 320, 192, 6.0),
        ("tsr", 64, 320, 192, 12.0),
        ("tsr", 128, 320, 192, 24.0),
        ("ssr", 128, 1280, 768, 24.0),
    ]
    assert [r["name"] for r in rows] == ["base", "tsr1", "ssr1", "ssr2", "tsr2", "tsr3", "ssr3"]
    assert rows[0]["input"] is None and rows[0]["factor"] == 1
    for prev, row in itertools.pairwise(rows):
        src = row["input"]
        assert src == {k: prev[k] for k in ("frames", "height", "width", "fps")}
        k = row["factor"]
        if row["kind"] == "tsr":
            assert (k, row["frames"], row["fps"]) == (2, 2 * src["frames"], 2 * src["fps"])
            assert (row["height"], row["width"]) == (src["height"], src["width"])
        else:
            assert k >= 2 and (row["height"], row["width"]) == (k * src["height"], k * src["width"])
            assert (row["frames"], row["fps"]) == (src["frames"], src["fps"])
    assert all(r["checkpoint"] == "" and r["model_source"] == "config" for r in rows)
    json.dumps(rows)  # plain values only


def test_demo_and_image_cascades_load_and_plan(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative checkpoints resolve against the cwd: nothing trained here
    demo = plan_cascade(load_cascade(CASCADES / "demo.yaml"))
    assert [(r["name"], r["kind"], r["frames"], r["height"], r["width"], r["fps"]) for r in demo] == [
        ("base", "base", 8, 16, 16, 4.0),
        ("tsr", "tsr", 16, 16, 16, 8.0),
        ("ssr", "ssr", 16, 64, 64, 8.0),
    ]
    assert [r["checkpoint"] for r in demo] == ["runs/demo/base", "runs/demo/tsr", "runs/demo/ssr"]
    assert {r["model_source"] for r in demo} == {"config"}

    image = plan_cascade(load_cascade(CASCADES / "image.yaml"))
    assert [(r["kind"], r["height"], r["width"]) for r in image] == [
        ("base", 32, 32),
        ("ssr", 64, 64),
        ("ssr", 128, 128),
    ]
    assert all(r["frames"] == 1 and r["fps"] == 0 for r in image)
    assert all(r["input"]["frames"] == 1 for r in image[1:])
    table = format_cascade_plan(image)
    assert "1×64×64@0 → 1×128×128@0" in table and table.splitlines()[-1].startswith("total")


# ------------------------------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    ("stages", "pattern"),
    [
        (  # a TSR stage that changes the height
            [BASE, _stage("up", "tsr", 16, 64, 32, 8.0)],
            r"stage 'up' \(tsr, stages\[1\]\) after 'base': height 32 → 64 changed.*expected height 32",
        ),
        (  # a TSR stage that does not multiply the frames
            [BASE, _stage("up", "tsr", 8, 32, 32, 4.0)],
            r"stage 'up' .* after 'base': frames 8 → 8 is not a whole-number multiple ≥ 2",
        ),
        (  # fps not scaled with the frames
            [BASE, _stage("up", "tsr", 16, 32, 32, 4.0)],
            r"stage 'up' .* after 'base': fps 4 → 4, but frames grow 2×.*expected fps 8",
        ),
        (  # SSR by a non-integer factor
            [BASE, _stage("big", "ssr", 8, 48, 48, 4.0)],
            r"stage 'big' \(ssr, stages\[1\]\) after 'base': height 32 → 48 is not a whole-number multiple",
        ),
        (  # SSR by unequal factors
            [BASE, _stage("big", "ssr", 8, 64, 128, 4.0)],
            r"stage 'big' .* after 'base': height ×2 but width ×4",
        ),
        (  # SSR that changes the frame count
            [BASE, _stage("big", "ssr", 16, 64, 64, 8.0)],
            r"stage 'big' .* after 'base': frames/fps 8@4 → 16@8 changed",
        ),
        (  # base not first: both stages named
            [_stage("up", "tsr", 8, 32, 32, 4.0), _stage("gen", "base", 16, 32, 32, 8.0)],
            r"stages\[0\] 'up' is tsr: the first stage must be base; "
            r"move base stage 'gen' \(stages\[1\]\) first",
        ),
        (  # a second base
            [BASE, _stage("again", "base", 8, 32, 32, 4.0)],
            r"stage 'again' \(base, stages\[1\]\) after 'base': only the first stage may be base",
        ),
        (  # duplicate names
            [BASE, _stage("base", "ssr", 8, 64, 64, 4.0)],
            r"stages\[1\]\.name: 'base' is also the name of stages\[0\]",
        ),
        ([_stage("", "base", 8, 32, 32, 4.0)], r"stages\[0\]\.name: empty"),
        ([_stage("b", "upscale", 8, 32, 32, 4.0)], r"stages\[0\]\.kind: unknown value 'upscale'"),
        ([{**BASE, "sampler": "euler"}], r"stages\[0\]\.sampler: unknown value 'euler'"),
        ([{**BASE, "cond_aug_level": 1.5}], r"stages\[0\]\.cond_aug_level: got 1.5"),
        ([{**BASE, "fps": -1.0}], r"stages\[0\]\.fps: got -1.0, expected >= 0"),
        ([{**BASE, "steps": 0}], r"stages\[0\]\.steps: got 0, expected > 0"),
        ([{**BASE, "model": {"heads": 5}}], r"stages\[0\]\.model\.width: 64 is not divisible"),
        (
            [{**BASE, "model": {"patch_size": [1, 3, 3]}}],
            r"stages\[0\]\.height=32 \(stage 'base'\) is not divisible by "
            r"stages\[0\]\.model\.patch_size\[1\]=3",
        ),
        ([], r"stages: a cascade needs at least one stage"),
    ],
)
def test_bad_cascades_are_rejected_naming_the_stages(tmp_path, stages, pattern):
    path = _write(tmp_path, stages)
    with pytest.raises(ConfigError, match=pattern) as err:
        load_cascade(path)
    assert str(err.value).startswith(f"{path}: ")


def test_unknown_keys_name_the_file_and_the_key(tmp_path):
    path = _write(tmp_path, [BASE, _stage("up", "tsr", 16, 32, 32, 8.0, stpes=3)])
    with pytest.raises(
        ConfigError, match=r"unknown key 'stages\[1\]\.stpes'; did you mean 'stages\[1\]\.steps'"
    ) as e:
        load_cascade(path)
    assert str(path) in str(e.value)
    path = _write(tmp_path, [{**BASE, "model": {"widht": 96}}])
    with pytest.raises(ConfigError, match=r"unknown key 'stages\[0\]\.model\.widht'; did you mean"):
        load_cascade(path)
    path = _write(tmp_path, [BASE], stage=[])
    with pytest.raises(ConfigError, match=rf"{path}: unknown key 'stage'; did you mean 'stages'"):
        load_cascade(path)
    path = _write(tmp_path, [{**BASE, "steps": "many"}])
    with pytest.raises(ConfigError, match=r"invalid value for 'stages\[0\]\.steps'"):
        load_cascade(path)
    path = tmp_path / "list.yaml"
    path.write_text("stages: {base: {}}\n")
    with pytest.raises(ConfigError, match="'stages' must be a list"):
        load_cascade(path)


def test_presets_and_overrides(tmp_path):
    path = _write(
        tmp_path, [{**BASE, "model": {"preset": "S", "depth": 3}}, _stage("up", "tsr", 16, 32, 32, 8.0)]
    )
    cascade = load_cascade(path, ["name=renamed", "stages.1.steps=7", "stages[1].model.preset=B"])
    base, up = cascade.stages
    assert cascade.name == "renamed"
    assert (base.model.width, base.model.depth, base.model.heads) == (384, 3, 6)  # preset beneath explicit
    assert (up.steps, up.model.width, up.model.depth) == (7, 768, 12)
    with pytest.raises(ConfigError, match=r"override 'stages\.1\.stpes=7': unknown key 'stages\[1\]\.stpes'"):
        load_cascade(path, ["stages.1.stpes=7"])
    with pytest.raises(ConfigError, match=r"no stage '5'.*0\.\.1 \(the cascade has 2 stages\)"):
        load_cascade(path, ["stages.5.steps=7"])
    with pytest.raises(ConfigError, match=r"stages\[1\]\.model\.preset: unknown preset 'XXL'"):
        load_cascade(path, ["stages.1.model.preset=XXL"])
    with pytest.raises(ConfigError, match="after 'base': frames 8 → 12"):
        load_cascade(path, ["stages.1.frames=12"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_cascade(path, ["stages.1.steps"])


def test_stage_factor():
    stages = load_cascade(CASCADES / "imagen_video.yaml").stages
    factors = [stage_factor(None, stages[0])] + [stage_factor(a, b) for a, b in itertools.pairwise(stages)]
    assert factors == [1, 2, 2, 4, 2, 2, 4]
    validate_cascade(load_cascade(CASCADES / "demo.yaml"))


# ------------------------------------------------------------------------------------------- plan


def _fake_checkpoint(out_dir: Path, overrides: list[str], committed: bool = True) -> tuple[Path, Any]:
    """A step directory holding only config.yaml (+ the COMMITTED marker): no weights."""
    run = load_config(overrides=["model.preset=tiny", *overrides])
    step = out_dir / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    dump_config(run, step / "config.yaml")
    if committed:
        (step / "COMMITTED").write_text("")
    return step, run


def test_plan_reads_the_checkpoint_config_when_committed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    step, run = _fake_checkpoint(
        Path("runs/demo/tsr"), ["model.kind=tsr", "model.sr_factor=2", "model.width=96", "text.max_length=32"]
    )
    _fake_checkpoint(Path("runs/demo/ssr"), ["model.kind=ssr", "model.width=128"], committed=False)
    cascade = load_cascade(CASCADES / "demo.yaml", ["stages.1.guidance_scale=2"])
    rows = plan_cascade(cascade)
    tsr, ssr = rows[1], rows[2]
    assert tsr["model_source"] == str(step)
    assert tsr["parameters"] == parameter_count(run.model) != parameter_count(cascade.stages[1].model)
    assert tsr["flops_per_step"] == 2 * forward_flops(run.model, 16, 16, 16, 32).total  # CFG; its text length
    assert ssr["model_source"] == "config"  # no COMMITTED marker: not trusted
    assert rows[0]["model_source"] == "config"  # never trained

    # a step directory named directly works too
    direct = dataclasses.replace(cascade.stages[1], checkpoint=str(step))
    again = plan_cascade(dataclasses.replace(cascade, stages=[cascade.stages[0], direct]))
    assert again[1]["model_source"] == str(step)


def test_plan_rejects_a_checkpoint_of_the_wrong_kind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    step, _ = _fake_checkpoint(Path("runs/demo/tsr"), ["model.kind=ssr"])
    with pytest.raises(
        ConfigError,
        match=rf"stage 'tsr' \(checkpoint {step}\): the checkpoint is a ssr model, the stage is kind tsr",
    ):
        plan_cascade(load_cascade(CASCADES / "demo.yaml"))


def test_plan_flops_match_an_independent_count(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = ["stages.0.guidance_scale=4", "stages.2.guidance_scale=1"]
    cascade = load_cascade(CASCADES / "demo.yaml", settings)
    rows = plan_cascade(cascade, batch_size=3)
    base, ssr = cascade.stages[0], cascade.stages[2]
    expected = 2 * forward_flops(base.model, 8, 16, 16, 64).total  # guidance 4: two passes per step
    assert rows[0]["flops_per_step"] == expected
    assert rows[0]["flops"] == expected * base.steps * 3
    ssr_model = dataclasses.replace(ssr.model, kind="ssr")  # the stage's kind counts
    assert rows[2]["flops"] == forward_flops(ssr_model, 16, 64, 64, 64).total * ssr.steps * 3  # no CFG
    assert rows[2]["tokens"] == 16 * (64 // 4) * (64 // 4)  # the demo ssr model patches 1×4×4
    assert rows[0]["memory_gib"] * 2**30 > 4 * rows[0]["parameters"]
    naive = load_cascade(CASCADES / "demo.yaml", [*settings, "stages.0.model.attention_backend=naive"])
    assert plan_cascade(naive)[0]["memory_gib"] > plan_cascade(cascade)[0]["memory_gib"]
    table = format_cascade_plan(rows)
    assert all(name in table for name in ("base", "tsr", "ssr", "total", "8×16×16@4 → 16×16×16@8"))


def test_the_plan_splits_gpus_by_stage_flops(capsys):
    from pipeline.cli import main
    from stages.render import plan_replicas
    from stages.render.plan import video_flops

    rows = plan_cascade(load_cascade(CASCADES / "imagen_video.yaml"))
    split = plan_replicas(rows, 64, 200.0)
    assert sum(s["replicas"] for s in split) == 64 and all(s["replicas"] >= 1 for s in split)
    per_replica = [video_flops(r) / s["replicas"] for r, s in zip(rows, split)]
    assert split[0]["bottleneck"] == rows[per_replica.index(max(per_replica))]["name"]
    for r, s in zip(rows, split):  # one replica fewer on any stage would make it the new bottleneck
        if s["replicas"] > 1:
            assert video_flops(r) / (s["replicas"] - 1) >= max(per_replica)
    assert split[-1]["replicas"] == max(s["replicas"] for s in split)  # ssr3: most of a video's FLOPs
    assert split[0]["pipeline_videos_per_hour"] == pytest.approx(3600 * 200e12 / max(per_replica))
    shared = plan_replicas(rows, 2, 200.0)  # fewer devices than stages: one each, sharing two GPUs
    assert [s["replicas"] for s in shared] == [1] * 7
    assert shared[0]["pipeline_videos_per_hour"] == pytest.approx(
        3600 * 2 * 200e12 / sum(map(video_flops, rows))
    )
    assert main(["render", "--cascade", str(CASCADES / "imagen_video.yaml"), "--plan", "--gpus", "64"]) == 0
    assert "64 devices: " in capsys.readouterr().out
