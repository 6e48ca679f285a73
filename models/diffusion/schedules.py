"""Continuous-time noise schedule and prediction parameterizations.

Diffusion time t lives in [0, 1]: t = 0 is clean data, t = 1 is (almost) pure noise. The forward
process is variance preserving, x_t = alpha(t)·x0 + sigma(t)·noise with alpha² + sigma² = 1, and is
described entirely by its log signal-to-noise ratio logsnr(t) = log(alpha² / sigma²). Everything
else (alpha, sigma, training targets, sampler coefficients) is derived from logsnr, so a resolution
shift is a single additive constant.

Time tensors are either (B,) (one time per sample) or (B, T) (one time per frame, used when
independent images are packed along the frame axis of a (B, C, T, H, W) batch). `broadcast_like`
turns such per-sample or per-frame coefficients into something that multiplies x directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from configs.schema import DiffusionConfig

Prediction = Literal["v", "eps", "x0"]
PREDICTIONS: tuple[str, ...] = ("v", "eps", "x0")

# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def broadcast_like(coef: Tensor | float, x: Tensor) -> Tensor | float:
    """View a per-sample (B,) or per-frame (B, T) coefficient so that it multiplies x elementwise.

    (B,) -> (B, 1, ..., 1) for any x; (B, T) -> (B, 1, T, 1, 1) for a 5-D video x (B, C, T, H, W).
    Python floats, 0-d tensors and tensors that already have x's rank pass through unchanged, which
    lets the same code serve samplers (one scalar time) and training (a time per sample or frame).
    """
    if not isinstance(coef, Tensor) or coef.ndim == 0 or coef.ndim == x.ndim:
        return coef
    if coef.shape[0] != x.shape[0]:
        raise ValueError(
            f"coefficient batch size {coef.shape[0]} does not match x batch size {x.shape[0]} "
            f"(coefficient shape {tuple(coef.shape)}, x shape {tuple(x.shape)})"
        )
    if coef.ndim == 1:
        return coef.reshape(coef.shape[0], *([1] * (x.ndim - 1)))
    if coef.ndim == 2:
        if x.ndim != 5 or coef.shape[1] != x.shape[2]:
            raise ValueError(
                f"per-frame coefficient of shape {tuple(coef.shape)} needs x of shape (B, C, T, H, W) "
                f"with T = {coef.shape[1]}, got x of shape {tuple(x.shape)}"
            )
        return coef[:, None, :, None, None]  # (B, T) -> (B, 1, T, 1, 1)
    raise ValueError(f"coefficient must have shape (B,) or (B, T), got {tuple(coef.shape)}")


def gaussian_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like x, drawn from `generator` (on the generator's own device).

    Drawing on the generator's device keeps a seeded CPU generator reproducible for GPU tensors, and
    matches `torch.randn(x.shape, generator=...)` exactly on CPU (peer samplers draw the same way).
    """
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    return noise.to(x.device)


def _as_time(t: Tensor | float) -> Tensor:
    """Times as a float64 tensor: schedule math near t = 0 and t = 1 needs the extra precision."""
    if isinstance(t, Tensor):
        return t.to(torch.float64)
    return torch.tensor(float(t), dtype=torch.float64)


def _out_dtype(t: Tensor | float) -> torch.dtype:
    """Return dtype for schedule values: t's own float dtype, at least float32."""
    if isinstance(t, Tensor) and t.is_floating_point():
        return torch.promote_types(t.dtype, torch.float32)
    return torch.float32 if isinstance(t, Tensor) else torch.float64


# ----------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------


def size_shift(numel: int, reference_numel: int) -> float:
    """Log-SNR shift for a sample of `numel` = T·H·W elements relative to the reference size.

    Larger inputs average noise over more elements, so at the same logsnr they look cleaner; shifting
    logsnr by log(reference / numel) (negative for bigger inputs, = 2·log(ref_side / side) for square
    images) keeps the effective noise level comparable (Simple Diffusion, Hoogeboom et al. 2023).
    """
    if numel <= 0 or reference_numel <= 0:
        raise ValueError(f"numel and reference_numel must be positive, got {numel} and {reference_numel}")
    return math.log(reference_numel / numel)


@dataclass(frozen=True)
class CosineSchedule:
    """Variance-preserving cosine schedule in log-SNR form, truncated to [logsnr_min, logsnr_max].

    logsnr(t) = -2·log(tan(a·t + b)) + shift, with b and a chosen so that logsnr(0) = logsnr_max and
    logsnr(1) = logsnr_min before the shift. Truncation keeps alpha and sigma away from exactly 0,
    so every parameterization stays invertible; `shift` (in log-SNR units, see `size_shift`) moves
    the whole curve down for larger inputs that need more noise.
    """

    logsnr_min: float = -15.0
    logsnr_max: float = 15.0
    shift: float = 0.0

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, numel: int) -> CosineSchedule:
        """The configured schedule for samples of `numel` = T·H·W pixels (shifted when configured)."""
        shift = size_shift(numel, cfg.shift_reference_numel) if cfg.shift_reference_numel else 0.0
        return cls(logsnr_min=cfg.logsnr_min, logsnr_max=cfg.logsnr_max, shift=shift)

    def __post_init__(self) -> None:
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(
                f"logsnr_min ({self.logsnr_min}) must be smaller than logsnr_max ({self.logsnr_max})"
            )

    @property
    def _b(self) -> float:
        return math.atan(math.exp(-0.5 * self.logsnr_max))

    @property
    def _a(self) -> float:
        return math.atan(math.exp(-0.5 * self.logsnr_min)) - self._b

    def logsnr(self, t: Tensor | float) -> Tensor:
        """Log signal-to-noise ratio at time t (same shape as t); decreasing in t."""
        tt = _as_time(t)
        out = -2.0 * torch.log(torch.tan(self._a * tt + self._b)) + self.shift
        return out.to(_out_dtype(t))

    def t_from_logsnr(self, logsnr: Tensor | float) -> Tensor:
        """Exact inverse of `logsnr`: the time at which the schedule reaches the given log-SNR."""
        lam = _as_time(logsnr) - self.shift
        out = (torch.atan(torch.exp(-0.5 * lam)) - self._b) / self._a
        return out.to(_out_dtype(logsnr))

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Signal and noise scales (alpha, sigma) at time t, each shaped like t.

        Computed as sqrt(sigmoid(±logsnr)) rather than cos/sin so both stay accurate at the extremes,
        where one of them is tiny and 1 - (the other)² would cancel catastrophically.
        """
        lam = self.logsnr(_as_time(t))
        alpha = torch.sigmoid(lam).sqrt()
        sigma = torch.sigmoid(-lam).sqrt()
        dtype = _out_dtype(t)
        return alpha.to(dtype), sigma.to(dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """Sample the forward process: x_t = alpha(t)·x0 + sigma(t)·noise (t is (B,) or (B, T))."""
        alpha, sigma = self.alpha_sigma(t)
        alpha = broadcast_like(alpha.to(device=x0.device, dtype=x0.dtype), x0)
        sigma = broadcast_like(sigma.to(device=x0.device, dtype=x0.dtype), x0)
        return alpha * x0 + sigma * noise


# ----------------------------------------------------------------------------------------------------
# Prediction parameterizations
# ----------------------------------------------------------------------------------------------------


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {', '.join(PREDICTIONS)}")


def training_target(
    x0: Tensor, noise: Tensor, alpha: Tensor | float, sigma: Tensor | float, prediction: Prediction
) -> Tensor:
    """What the model should output for x_t = alpha·x0 + sigma·noise under `prediction`.

    "v" (velocity, alpha·noise - sigma·x0) keeps the target at unit scale across all noise levels,
    which is why Imagen Video and Simple Diffusion train with it; "eps" and "x0" are the classic ones.
    alpha and sigma may be floats, (B,)/(B, T) tensors, or already broadcast to x0.
    """
    _check_prediction(prediction)
    alpha, sigma = broadcast_like(alpha, x0), broadcast_like(sigma, x0)
    if prediction == "v":
        return alpha * noise - sigma * x0
    if prediction == "eps":
        return noise
    return x0


def to_x0_eps(
    model_output: Tensor, x_t: Tensor, alpha: Tensor | float, sigma: Tensor | float, prediction: Prediction
) -> tuple[Tensor, Tensor]:
    """Convert a model output in any parameterization into the (x0, eps) pair samplers work with.

    Uses alpha² + sigma² = 1 (variance preserving), so v converts without any division.
    """
    _check_prediction(prediction)
    alpha, sigma = broadcast_like(alpha, x_t), broadcast_like(sigma, x_t)
    if prediction == "v":
        return alpha * x_t - sigma * model_output, sigma * x_t + alpha * model_output
    if prediction == "eps":
        return (x_t - sigma * model_output) / alpha, model_output
    return model_output, (x_t - alpha * model_output) / sigma
