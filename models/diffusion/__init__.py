"""Diffusion core: schedules, losses, samplers, guidance and conditioning augmentation.

Pure functions and small classes; every function that needs the model takes it as an argument.
"""

from models.diffusion.augment import augment_condition, sample_augment_levels
from models.diffusion.distill import distillation_loss, student_times, two_step_target
from models.diffusion.guidance import classifier_free_guidance, dynamic_threshold, guidance_scale_at
from models.diffusion.losses import loss_weight, training_loss
from models.diffusion.samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    Sampler,
    make_sampler,
    sample_loop,
    uniform_timesteps,
)
from models.diffusion.schedules import (
    CosineSchedule,
    Prediction,
    broadcast_like,
    gaussian_like,
    size_shift,
    to_x0_eps,
    training_target,
)

__all__ = [
    "CosineSchedule",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPP2MSampler",
    "Prediction",
    "Sampler",
    "augment_condition",
    "broadcast_like",
    "classifier_free_guidance",
    "distillation_loss",
    "dynamic_threshold",
    "gaussian_like",
    "guidance_scale_at",
    "loss_weight",
    "make_sampler",
    "sample_augment_levels",
    "sample_loop",
    "size_shift",
    "student_times",
    "to_x0_eps",
    "training_loss",
    "training_target",
    "two_step_target",
    "uniform_timesteps",
]
