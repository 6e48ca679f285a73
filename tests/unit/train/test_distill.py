"""A distillation run's config and teacher: what validation refuses, what the teacher must share with its
student, the student's first weights (a guidance input that starts as nothing), and how a cascade stage
samples a student."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from configs import CascadeStageConfig, ConfigError, dump_config, load_config, network_passes, stage_sampling
from stages.artifacts import step_dir
from stages.train.distill import load_teacher
from stages.train.trainer import DiffusionTrainer
from tests.render_fixtures import make_checkpoint


@pytest.fixture
def teacher(tmp_path) -> Path:
    """A committed base checkpoint (tiny, 4×16×16 @ 4 fps) with weights that depend on every input."""
    return make_checkpoint(tmp_path / "teacher", "base", 2, 4, 16, 16, 4.0)


def _student(teacher: Path, *overrides: str):
    """The teacher's own run config as a student of it."""
    config = step_dir(teacher, 10) / "config.yaml"
    return load_config(
        [config], [f"distill.teacher={teacher}", f"train.out_dir={teacher.parent / 's'}", *overrides]
    )


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, 16, 16, generator=g)
    kwargs = {"text": torch.randn(2, 5, 64, generator=g), "text_mask": torch.ones(2, 5, dtype=torch.bool)}
    return x, torch.rand(2, generator=g), kwargs | {"fps": torch.full((2,), 4.0)}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["distill.steps=4"], r"distill.steps=4 but distill.teacher is empty"),
        (["model.guidance_range=[1,4]"], r"model.guidance_range: a guidance input is learned from a teacher"),
        (
            ["distill.teacher=runs/base"],
            r"distill.steps=0 is a guidance round, which needs model.guidance_range",
        ),
        (
            ["distill.teacher=runs/base", "model.guidance_range=[4,1]"],
            r"model.guidance_range: got \[4.0, 1.0\], expected \[\] or \[w_min, w_max\] with 0 <= w_min",
        ),
        (["distill.teacher=runs/base", "distill.steps=-2"], r"distill.steps: got -2"),
    ],
)
def test_bad_distillation_settings_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], overrides)


def test_a_guidance_student_starts_as_its_teacher_and_its_weight_input_is_live(teacher):
    cfg = _student(teacher, "distill.steps=0", "model.guidance_range=[1,4]")
    frozen = load_teacher(cfg)
    assert frozen.steps == 0 and not frozen.guided and frozen.prediction == cfg.diffusion.prediction
    student = DiffusionTrainer(cfg, None, frozen).dit.eval()
    x, t, kw = _inputs()
    with torch.no_grad():
        expected = frozen.dit(x, t, **kw)
        for weight in (1.0, 2.5, 4.0):
            torch.testing.assert_close(student(x, t, guidance=torch.full((2,), weight), **kw), expected)
        torch.nn.init.normal_(student.guidance_embed.mlp[-1].weight, std=0.05)
        assert not torch.allclose(student(x, t, guidance=torch.full((2,), 3.0), **kw), expected, atol=1e-4)
    assert not any(p.requires_grad for p in frozen.dit.parameters())
    assert "teacher" not in dict(
        DiffusionTrainer(cfg, None, frozen).named_children()
    )  # never in DeepSpeed's view


def test_a_progressive_student_starts_as_its_teacher(teacher):
    cfg = _student(teacher, "distill.steps=8")
    frozen = load_teacher(cfg)
    assert frozen.steps == 16 and frozen.step == step_dir(teacher, 10).resolve()
    module = DiffusionTrainer(cfg, None, frozen)
    for name, value in frozen.dit.state_dict().items():
        assert torch.equal(module.dit.state_dict()[name], value), name
    for name, value in frozen.text.state_dict().items():
        assert torch.equal(module.text.state_dict()[name], value), name


def test_the_teacher_must_share_the_students_model_text_and_schedule(teacher):
    with pytest.raises(ValueError, match=r"the student's model must be the teacher's \(model.depth: 2 ≠ 3\)"):
        load_teacher(_student(teacher, "distill.steps=8", "model.depth=3"))
    with pytest.raises(
        ValueError, match=r"diffusion.logsnr_min is .* both must walk the same noise schedule"
    ):
        load_teacher(_student(teacher, "distill.steps=8", "diffusion.logsnr_min=-12"))
    with pytest.raises(ValueError, match=r"the student's text section must be the teacher's"):
        load_teacher(_student(teacher, "distill.steps=8", "text.max_length=7"))
    with pytest.raises(FileNotFoundError, match=r"distill.teacher"):
        load_teacher(_student(teacher, "distill.steps=8", f"distill.teacher={teacher.parent / 'missing'}"))


def test_a_distilled_teacher_gives_its_student_half_its_steps(teacher, tmp_path):
    config = step_dir(teacher, 10) / "config.yaml"
    cfg = load_config([config])
    dump_config(
        dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher="x", steps=8)), config
    )
    assert load_teacher(_student(teacher, "distill.steps=4")).steps == 8
    with pytest.raises(
        ValueError, match=r"the teacher samples in 8 steps, so its student learns 4 \(distill.steps is 3"
    ):
        load_teacher(_student(teacher, "distill.steps=3"))


def test_passes_and_sampling_of_a_cascade_stage(teacher):
    guided = CascadeStageConfig(name="base", kind="base", sampler="ddpm", steps=64, guidance_scale=3.0)
    unguided = dataclasses.replace(guided, guidance_scale=1.0)
    oscillating = dataclasses.replace(unguided, guidance_schedule="oscillating")
    plain = load_config([step_dir(teacher, 10) / "config.yaml"])
    takes_weight = _student(teacher, "distill.steps=0", "model.guidance_range=[1,4]")
    assert [network_passes(s, plain.model) for s in (guided, unguided, oscillating)] == [2, 1, 2]
    assert [network_passes(s, takes_weight.model) for s in (guided, unguided, oscillating)] == [1, 1, 1]
    assert (stage_sampling(guided, plain)["sampler"], stage_sampling(guided, plain)["steps"]) == ("ddpm", 64)
    student = stage_sampling(guided, _student(teacher, "distill.steps=8"))
    assert (student["sampler"], student["steps"], student["guidance_scale"]) == ("ddim", 8, 3.0)
    assert stage_sampling(guided, takes_weight)["steps"] == 64  # a guidance round keeps the stage's steps


def test_the_training_plan_counts_the_teachers_forward_passes(teacher):
    from stages.train.plan import teacher_forwards, training_plan

    plain = load_config([step_dir(teacher, 10) / "config.yaml"])
    progressive = _student(teacher, "distill.steps=8")
    guidance_round = _student(teacher, "distill.steps=0", "model.guidance_range=[1,4]")
    both_at_once = _student(
        teacher, "distill.steps=8", "model.guidance_range=[1,4]"
    )  # teacher takes no weight
    chained = _student(
        teacher, "distill.steps=8", "model.guidance_range=[1,4]", "distill.teacher=runs/not-yet"
    )
    counts = [teacher_forwards(c) for c in (plain, progressive, guidance_round, both_at_once, chained)]
    assert counts == [0, 2, 2, 4, 2]
    assert (
        training_plan(both_at_once, 1)["flops_per_step"] == 7 / 3 * training_plan(plain, 1)["flops_per_step"]
    )
