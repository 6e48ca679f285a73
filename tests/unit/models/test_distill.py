"""The progressive-distillation target against the project's DDIM sampler: one student step with the
target as its model output lands exactly where two teacher steps land, at every grid time including the
last step to t = 0, and for every parameterization."""

from __future__ import annotations

import pytest
import torch

from models.diffusion import CosineSchedule, DDIMSampler
from models.diffusion.distill import two_step_target


def _teacher(prediction):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 6, generator=generator, dtype=torch.float64) * 0.4

    def model(x, t):  # any smooth function of (x, t): the identity must hold whatever the teacher
        return torch.tanh(x @ weight) * (1 + t.view(-1, 1, 1)) - 0.1 * x

    return model


@pytest.mark.parametrize("teacher_prediction", ["v", "eps", "x0"])
@pytest.mark.parametrize("student_prediction", ["v", "eps", "x0"])
def test_one_student_step_equals_two_teacher_steps(teacher_prediction, student_prediction):
    schedule, steps = CosineSchedule(), 4
    teacher = _teacher(teacher_prediction)
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for i in range(steps):
        t = torch.full((3,), 1.0 - i / steps, dtype=torch.float64)
        slow = DDIMSampler(schedule, 2 * steps, teacher_prediction)
        mid = slow.step(teacher(x, t), float(t[0]), x)
        t_mid = t - 0.5 / steps
        two = slow.step(teacher(mid, t_mid), float(t_mid[0]), mid)
        fast = DDIMSampler(schedule, steps, student_prediction)
        target = two_step_target(teacher, x, t, steps, schedule, teacher_prediction, student_prediction)
        one = fast.step(target, float(t[0]), x)
        torch.testing.assert_close(one, two, atol=1e-9, rtol=1e-9)
        x = two


def test_the_target_is_not_the_teachers_one_step_output():
    schedule, teacher = CosineSchedule(), _teacher("v")
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.ones(2, dtype=torch.float64)
    target = two_step_target(teacher, x, t, 2, schedule)
    assert not torch.allclose(target, teacher(x, t), atol=1e-3)  # two steps differ from one
    with pytest.raises(ValueError, match="student_steps must be >= 1"):
        two_step_target(teacher, x, t, 0, schedule)
