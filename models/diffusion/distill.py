"""Progressive distillation (Salimans & Ho 2022): the target that teaches a student to take, in one
deterministic DDIM step, the two DDIM steps its teacher takes, and the loss that regresses on it.

A student that samples in N steps walks the grid t_i = 1 - i/N; its teacher, with 2N steps, passes
through the midpoint t - 1/(2N) of every student step. From x_t the teacher steps t → t' = t - 1/(2N)
→ t'' = t - 1/N; the student's target is the clean sample x̃0 whose single DDIM step t → t'' lands on
the same x_t'':

    x_t'' = alpha_t''·x̃0 + sigma_t''·(x_t - alpha_t·x̃0) / sigma_t
    ⇒  x̃0 = (x_t'' - (sigma_t''/sigma_t)·x_t) / (alpha_t'' - (sigma_t''/sigma_t)·alpha_t).

At the last student step (t'' = 0, where the sampler returns its clean prediction) the target is the
teacher's final clean prediction itself. The target is returned in the student's parameterization
("v" as in Imagen Video's distilled cascade). Coefficients are computed in float64.

Guidance distillation (Meng et al. 2023) is the round before: the student, which takes the guidance
weight w as an input, regresses at any time on its teacher's classifier-free-guided output at w
(`student_steps = 0`); the teacher passed in is then that guided prediction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from models.diffusion.losses import Weighting, noised, weighted_error
from models.diffusion.schedules import (
    CosineSchedule,
    Prediction,
    broadcast_like,
    to_x0_eps,
    training_target,
)

ModelFn = Callable[[Tensor, Tensor], Tensor]
"""(x_t, t) → the model's output in its parameterization; t is (B,) float."""


def _coefficients(schedule: CosineSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    alpha, sigma = schedule.alpha_sigma(t.to(torch.float64))
    return tuple(broadcast_like(c.to(device=like.device, dtype=like.dtype), like) for c in (alpha, sigma))


def _ddim(x_t: Tensor, x0: Tensor, now: tuple[Tensor, Tensor], nxt: tuple[Tensor, Tensor]) -> Tensor:
    (alpha_t, sigma_t), (alpha_s, sigma_s) = now, nxt
    return alpha_s * x0 + sigma_s * (x_t - alpha_t * x0) / sigma_t


def two_step_target(
    teacher: ModelFn,
    x_t: Tensor,
    t: Tensor,
    student_steps: int,
    schedule: CosineSchedule,
    teacher_prediction: Prediction = "v",
    student_prediction: Prediction = "v",
) -> Tensor:
    """The student's regression target at (x_t, t) for `student_steps` sampling steps (see the module
    docstring): two teacher DDIM steps folded into one. `t` (B,) must lie on the student's grid."""
    if student_steps < 1:
        raise ValueError(f"student_steps must be >= 1, got {student_steps}")
    half = 0.5 / student_steps
    t_mid, t_end = t - half, (t - 2 * half).clamp(min=0.0)
    now, mid = _coefficients(schedule, t, x_t), _coefficients(schedule, t_mid, x_t)
    x0, _ = to_x0_eps(teacher(x_t, t), x_t, *now, teacher_prediction)
    x_mid = _ddim(x_t, x0, now, mid)
    x0_mid, _ = to_x0_eps(teacher(x_mid, t_mid), x_mid, *mid, teacher_prediction)
    last = broadcast_like((t_end <= 0).to(x_t.dtype).to(x_t.device), x_t)
    end = _coefficients(schedule, t_end.clamp(min=half), x_t)  # any t > 0 where this is the last step
    x_end = _ddim(x_mid, x0_mid, mid, end)
    ratio = end[1] / now[1]
    folded = (x_end - ratio * x_t) / (end[0] - ratio * now[0])
    target_x0 = last * x0_mid + (1 - last) * folded
    alpha, sigma = now
    noise = (x_t - alpha * target_x0) / sigma  # the noise that x_t and the target x0 imply
    return training_target(target_x0, noise, alpha, sigma, student_prediction)


def student_times(shape: tuple[int, ...], student_steps: int, generator: torch.Generator) -> Tensor:
    """Times drawn uniformly from the student's sampling grid 1, 1 - 1/N, ..., 1/N (float32, `shape`);
    `student_steps = 0` (a guidance round) draws them uniformly from [0, 1) as ordinary training does."""
    if student_steps == 0:
        return torch.rand(shape, generator=generator)
    index = torch.randint(0, student_steps, shape, generator=generator)
    return 1.0 - index.to(torch.float32) / student_steps


def distillation_target(
    teacher: ModelFn,
    x_t: Tensor,
    t: Tensor,
    student_steps: int,
    schedule: CosineSchedule,
    teacher_prediction: Prediction,
    student_prediction: Prediction,
) -> Tensor:
    """What the student regresses on at (x_t, t): two folded teacher steps (`two_step_target`), or for a
    guidance round (`student_steps = 0`) the teacher's own prediction, in the student's parameterization."""
    if student_steps:
        return two_step_target(
            teacher, x_t, t, student_steps, schedule, teacher_prediction, student_prediction
        )
    alpha, sigma = _coefficients(schedule, t, x_t)
    x0, eps = to_x0_eps(teacher(x_t, t), x_t, alpha, sigma, teacher_prediction)
    return training_target(x0, eps, alpha, sigma, student_prediction)


def distillation_loss(
    student: ModelFn,
    teacher: ModelFn,
    x0: Tensor,
    t: Tensor,
    noise: Tensor,
    schedule: CosineSchedule,
    student_steps: int,
    teacher_prediction: Prediction,
    prediction: Prediction = "v",
    weighting: Weighting = "none",
    min_snr_gamma: float = 5.0,
) -> Tensor:
    """Per-sample distillation loss (B,): x0 noised to t (on the student's grid, `student_times`), the
    frozen teacher's target (`distillation_target`, without gradients, in float32) and the student's
    weighted squared error against it, as `training_loss` weighs a diffusion loss."""
    x_t, _, _ = noised(x0, t, noise, schedule)
    with torch.no_grad():
        target = distillation_target(
            teacher, x_t.float(), t, student_steps, schedule, teacher_prediction, prediction
        )
    return weighted_error(student(x_t, t), target, t, schedule, prediction, weighting, min_snr_gamma)
