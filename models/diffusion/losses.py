"""Diffusion training loss: the model is an argument, never owned (DiT's `training_losses(model, x, t)`).

The caller draws t and noise (so it controls time sampling, per-frame times and seeding); this module
noises x0, calls the model and compares its output with the target of the chosen parameterization.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from models.diffusion.schedules import CosineSchedule, Prediction, broadcast_like, training_target

Weighting = Literal["none", "min_snr"]
WEIGHTINGS: tuple[str, ...] = ("none", "min_snr")


def loss_weight(
    logsnr: Tensor, prediction: Prediction, weighting: Weighting, min_snr_gamma: float = 5.0
) -> Tensor:
    """Per-sample (or per-frame) weight applied to the squared error in the target space.

    "min_snr" is Min-SNR-gamma (Hang et al. 2023): it weights the x0-space error by min(snr, gamma),
    capping the emphasis on nearly clean inputs so that no noise level dominates the gradient. The
    weight returned here is that x0-space weight rewritten for the chosen target: the x0 error equals
    sigma·(v error) and (sigma/alpha)·(eps error), hence min(snr, γ)/(snr + 1) for v and min(snr, γ)/snr
    for eps.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
    if weighting == "none":
        return torch.ones_like(logsnr)
    if min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
    snr = torch.exp(logsnr)
    clipped = torch.clamp(snr, max=min_snr_gamma)
    if prediction == "v":
        return clipped / (snr + 1.0)
    if prediction == "eps":
        return clipped / snr
    if prediction == "x0":
        return clipped
    raise ValueError(f"unknown prediction {prediction!r}; expected one of v, eps, x0")


def training_loss(
    model_fn: Callable[..., Tensor],
    x0: Tensor,
    t: Tensor,
    noise: Tensor,
    schedule: CosineSchedule,
    prediction: Prediction = "v",
    weighting: Weighting = "none",
    min_snr_gamma: float = 5.0,
    **model_kwargs: Any,
) -> Tensor:
    """Per-sample diffusion loss, shape (B,): mean over non-batch dims of weight·(output - target)².

    t is (B,) or, for images packed along the frame axis, (B, T); weights then differ per frame.
    model_fn(x_t, t, **model_kwargs) must return a tensor shaped like x0 in the `prediction`
    parameterization. Returning per-sample values lets the caller reduce, log per-bucket, or mask.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match x0 shape {tuple(x0.shape)}")
    loss_weight(schedule.logsnr(t), prediction, weighting, min_snr_gamma)  # validates weighting first
    x_t, alpha, sigma = noised(x0, t, noise, schedule)
    target = training_target(x0, noise, alpha, sigma, prediction)
    output = model_fn(x_t, t, **model_kwargs)
    return weighted_error(output, target, t, schedule, prediction, weighting, min_snr_gamma)


def noised(x0: Tensor, t: Tensor, noise: Tensor, schedule: CosineSchedule) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, alpha, sigma): x0 noised to times t (B,) or (B, T), with the schedule's coefficients at t
    in x0's device and dtype (not yet broadcast)."""
    alpha, sigma = schedule.alpha_sigma(t)
    alpha = alpha.to(device=x0.device, dtype=x0.dtype)
    sigma = sigma.to(device=x0.device, dtype=x0.dtype)
    return broadcast_like(alpha, x0) * x0 + broadcast_like(sigma, x0) * noise, alpha, sigma


def weighted_error(
    output: Tensor,
    target: Tensor,
    t: Tensor,
    schedule: CosineSchedule,
    prediction: Prediction,
    weighting: Weighting,
    min_snr_gamma: float,
) -> Tensor:
    """Per-sample mean over non-batch dims of weight·(output - target)², shape (B,)."""
    if output.shape != target.shape:
        raise ValueError(
            f"model output shape {tuple(output.shape)} does not match x0 shape {tuple(target.shape)}"
        )
    weight = loss_weight(schedule.logsnr(t), prediction, weighting, min_snr_gamma)  # (B,) or (B, T)
    # Reduce in at least float32 so bf16 model outputs do not lose the small residuals.
    dtype = torch.promote_types(output.dtype, torch.float32)
    sq_err = (output.to(dtype) - target.to(dtype)) ** 2
    weighted = broadcast_like(weight.to(device=output.device, dtype=dtype), sq_err) * sq_err
    return weighted.flatten(1).mean(dim=1)  # (B,)
