"""Noise conditioning augmentation for super-resolution models (Cascaded Diffusion, Imagen, Imagen Video).

A super-resolution stage is conditioned on the previous stage's output. Training it on clean
downsampled videos but sampling it on generated ones is a train-test mismatch; corrupting the
condition with forward-process noise at a random level during training (and a fixed, small level at
sampling time), and telling the model that level, makes each stage robust to its predecessor's
artifacts. Levels use the same time axis as the diffusion schedule: 0 = clean, 1 = pure noise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.diffusion.schedules import CosineSchedule, broadcast_like, gaussian_like


def augment_condition(
    cond: Tensor,
    level: Tensor | float,
    schedule: CosineSchedule,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Noise the conditioning video to `level` (B,) in [0, 1]: alpha(level)·cond + sigma(level)·noise.

    Samples whose level is exactly 0 are returned bit-for-bit unchanged (the truncated schedule's
    alpha(0) is just below 1, so the formula alone would still perturb them slightly).
    """
    batch = cond.shape[0]
    if not isinstance(level, Tensor):
        level = torch.full((batch,), float(level), dtype=torch.float64, device=cond.device)
    if level.ndim != 1 or level.shape[0] != batch:
        raise ValueError(f"level must have shape ({batch},), got {tuple(level.shape)}")
    if bool(((level < 0) | (level > 1)).any()):
        raise ValueError("augmentation levels must lie in [0, 1]")
    level = level.to(cond.device)
    alpha, sigma = schedule.alpha_sigma(level)  # (B,) each
    alpha = broadcast_like(alpha.to(cond.dtype), cond)
    sigma = broadcast_like(sigma.to(cond.dtype), cond)
    noisy = alpha * cond + sigma * gaussian_like(cond, generator)
    keep = broadcast_like(level == 0, cond)
    return torch.where(keep, cond, noisy)


def sample_augment_levels(
    batch: int,
    max_level: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training-time augmentation levels, uniform in [0, max_level], shape (batch,) float32."""
    if not 0.0 <= max_level <= 1.0:
        raise ValueError(f"max_level must be in [0, 1], got {max_level}")
    gen_device = generator.device if generator is not None else device
    levels = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float32)
    return (levels * max_level).to(device) if device is not None else levels * max_level
