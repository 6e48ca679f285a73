"""A pipeline's stage configs: the paths it sets are typed fields, and they give exactly the run configs,
cascade and stage fingerprints that the same settings given as `key=value` override strings give (a
changed fingerprint would retrain every existing run directory)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from configs import ConfigError, fingerprint, load_cascade, load_config, to_dict
from pipeline.job import PipelineJob, load_pipeline, split_items
from tests import ROOT

DEMO = ROOT / "configs" / "pipeline" / "demo.yaml"


def _overridden(items: list[str], extra: list[str]):
    """A run config loaded with the pipeline's paths as override strings after the user's items."""
    paths, overrides = split_items(items)
    return load_config(paths, [*overrides, *extra])


def _expected(overrides: list[str]) -> tuple[PipelineJob, dict[str, str]]:
    """The job, and its stage fingerprints computed from configs loaded with override strings."""
    cfg = load_pipeline([DEMO], overrides)
    job = PipelineJob(cfg)
    out = Path(cfg.out_dir)
    pre = _overridden(cfg.preprocess, [f"preprocess.out={out / 'shards'}"])
    assert job.preprocess == pre
    expected = {"preprocess": fingerprint({"config": to_dict(pre), "inputs": [str(out / "data")]})}
    students = {}
    for name, t in cfg.trainings.items():
        # the training, then its rounds: each an ordinary training whose teacher is the one before
        runs = [(name, t.config)]
        for steps in t.distill.rounds:
            teacher = runs[-1][0]
            runs.append(
                (
                    f"{name}-distill-{steps}",
                    [*t.config, *t.distill.config, f"distill.teacher={out / teacher}"],
                )
            )
            runs[-1][1].append(f"distill.steps={steps}")
            students[name] = runs[-1][0]
        for run_name, items in runs:
            run = _overridden(
                items, [f"data.shards={out / 'shards' / 'shards'}", f"train.out_dir={out / run_name}"]
            )
            assert job.trainings[run_name] == run, run_name
            expected[f"train-{run_name}"] = fingerprint({"config": to_dict(run), "workers": t.workers})
    names = [s.name for s in load_cascade(cfg.cascade, cfg.cascade_overrides).stages]
    pointed = [f"stages.{i}.checkpoint={out / n}" for i, n in enumerate(names) if n in cfg.trainings]
    pointed += [f"stages.{i}.distilled={out / students[n]}" for i, n in enumerate(names) if n in students]
    cascade = load_cascade(cfg.cascade, [*cfg.cascade_overrides, *pointed])
    assert job.cascade == cascade
    expected["render"] = fingerprint({"cascade": to_dict(cascade), "prompts": cfg.prompts, "seed": 0})
    return job, expected


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["out_dir=/tmp/elsewhere/run", "trainings.ssr.workers=2"],
        ["trainings.base.config=[configs/demo/base.yaml,data.shards=mine,train.out_dir=mine]"],
        ["cascade_overrides=[stages.0.checkpoint=ignored,stages.1.steps=3]"],
    ],
)
def test_typed_paths_give_the_configs_and_fingerprints_of_override_strings(overrides):
    job, expected = _expected(overrides)
    got = {s.name: s.fingerprint for s in job.stages()}
    assert {name: got[name] for name in expected} == expected


def test_a_bad_training_config_names_the_training():
    with pytest.raises(ConfigError, match=r"^trainings.base: .*model.depth: got 0, expected > 0"):
        PipelineJob(load_pipeline([DEMO], ["trainings.base.config=[configs/demo/base.yaml,model.depth=0]"]))


@pytest.mark.parametrize(
    ("overrides", "extra"),
    [
        ([], {}),
        (["render.batch_size=2", "render.out_dir=elsewhere", "render.devices=4", "render.device=cpu"], {}),
        (["render.seed=3"], {"seed": 3}),
        (["render.precision=bf16"], {"precision": "bf16"}),
        (
            ["render.save_intermediate=false", "render.contact_sheet=false"],
            {"save_intermediate": False, "contact_sheet": False},
        ),
    ],
)
def test_the_render_section_reaches_the_render_stage_and_only_non_defaults_enter_its_fingerprint(
    overrides, extra
):
    job, expected = _expected(overrides)
    settings = {"cascade": to_dict(job.cascade), "prompts": job.cfg.prompts, "seed": 0, **extra}
    assert {s.name: s.fingerprint for s in job.stages()}["render"] == fingerprint(settings)
    assert job.render == dataclasses.replace(job.cfg.render, out_dir=str(Path(job.cfg.out_dir) / "renders"))
    if not extra:  # the demo's settings (render.batch_size 6) and devices do not change what is rendered
        assert fingerprint(settings) == expected["render"]


def test_ray_train_makes_paths_absolute_and_leaves_shard_urls_alone(tmp_path, monkeypatch):
    from configs import load_config
    from pipeline.ray_train import _absolute

    monkeypatch.chdir(tmp_path)
    for url in ("http://127.0.0.1:8000/train-{000000..000003}.tar", "pipe:cat /data/train-000000.tar"):
        cfg = _absolute(load_config(overrides=[f"data.shards={url}", "train.out_dir=runs/x"]))
        assert cfg.data.shards == url and cfg.train.out_dir == str(tmp_path / "runs" / "x")
    assert _absolute(load_config(overrides=["data.shards=shards"])).data.shards == str(tmp_path / "shards")
    student = _absolute(load_config(overrides=["distill.teacher=runs/base", "distill.steps=4"]))
    assert student.distill.teacher == str(tmp_path / "runs" / "base")


def test_distillation_rounds_follow_their_training_and_the_teachers_render_beside_the_students():
    overrides = ["trainings.base.distill.rounds=[10,5]", "trainings.base.distill.guidance=[1,4]"]
    job = PipelineJob(load_pipeline([DEMO], overrides))
    out = job.out
    rounds = ["base-guidance", "base-distill-10", "base-distill-5"]
    stages = {s.name: s for s in job.stages()}
    names = list(stages)
    assert (
        names.index("train-base") < names.index("train-base-guidance") < names.index("train-base-distill-5")
    )
    for teacher, student, steps in zip(["base", *rounds[:-1]], rounds, [0, 10, 5], strict=True):
        run = job.trainings[student]
        assert stages[f"train-{student}"].deps == (f"train-{teacher}",)
        assert (run.distill.teacher, run.distill.steps) == (str(out / teacher), steps)
        assert run.model.guidance_range == [1.0, 4.0] and run.train.out_dir == str(out / student)
        assert run.train.steps == 200  # configs/demo/distill.yaml, over the base's own
        assert dataclasses.replace(run.model, guidance_range=[]) == job.trainings["base"].model
    base = job.cascade.stages[0]
    assert (base.checkpoint, base.distilled) == (str(out / "base"), str(out / "base-distill-5"))
    assert all(not s.distilled for s in job.cascade.stages[1:])
    trained = {f"train-{name}" for name in job.trainings}
    assert set(stages["render"].deps) == set(stages["render-teacher"].deps) == trained
    assert stages["render-teacher"].outputs == [out / "renders-teacher"]
    assert stages["report"].deps == ("render", "render-teacher")
    assert stages["render"].fingerprint != stages["render-teacher"].fingerprint


def test_a_pipeline_without_distillation_has_no_teacher_render():
    job = PipelineJob(load_pipeline([DEMO], ["trainings.base.distill.rounds=[]"]))
    names = [s.name for s in job.stages()]
    assert "render-teacher" not in names and not any("distill" in n for n in names)
    assert job.cascade.stages[0].distilled == ""


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "trainings.base.distill.rounds=[10,4]",
            r"trainings.base.distill.rounds: \[10, 4\]; each round halves",
        ),
        ("trainings.base.distill.guidance=[4,1]", r"trainings.base.distill.guidance: got \[4.0, 1.0\]"),
        ("trainings.base.distill.rounds=[0]", r"trainings.base.distill.rounds\[0\]: got 0"),
    ],
)
def test_bad_distillation_rounds_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline([DEMO], [override])
