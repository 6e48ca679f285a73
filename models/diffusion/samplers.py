"""Samplers with a diffusers-like `step(model_output, t, sample)` interface; the model is never owned.

All samplers walk the same descending grid of continuous times, t_i = 1 - i/num_steps (or an explicit
grid), and the step from the last grid time goes to t = 0, returning the clean prediction. Each step
turns the model output into an (x0, eps) pair, optionally thresholds x0 (Imagen dynamic
thresholding), and moves the sample from t to the next time s < t:

- `DDPMSampler`: ancestral sampling from the forward-process posterior q(x_s | x_t, x0 = x0_hat).
- `DDIMSampler`: DDIM; eta = 0 is the deterministic probability-flow discretization, eta = 1 has
  exactly the DDPM posterior variance (and mean).
- `DPMSolverPP2MSampler`: DPM-Solver++(2M), a second-order multistep solver of the same ODE in data
  (x0) prediction form; first order at the first step and at the final step to t = 0.

Coefficients are computed in float64 from the schedule and enter the update as python floats, so the
sample keeps its own dtype. `sample_loop` strings the steps together for a model function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from models.diffusion.schedules import CosineSchedule, Prediction, gaussian_like, to_x0_eps

SamplerName = Literal["ddpm", "ddim", "dpmpp_2m"]
SAMPLER_NAMES: tuple[str, ...] = ("ddpm", "ddim", "dpmpp_2m")

# ----------------------------------------------------------------------------------------------------
# Base: time grid, coefficient lookup, x0 / eps conversion
# ----------------------------------------------------------------------------------------------------


def uniform_timesteps(num_steps: int) -> Tensor:
    """Descending, uniformly spaced sampling times 1, 1 - 1/n, ..., 1/n (float64, shape (n,))."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    return 1.0 - torch.arange(num_steps, dtype=torch.float64) / num_steps


class Sampler:
    """Shared machinery: the time grid, schedule coefficients and the model-output conversion.

    Subclasses implement `_move(index, x0, eps, sample, t, s, generator)`, which maps the sample from
    grid time t to the next time s > 0; the final step to t = 0 is handled here and returns x0.
    `timesteps`, when given, replaces the uniform grid with explicit descending times in (0, 1]
    (e.g. to reproduce another implementation's discretization exactly).
    """

    def __init__(
        self,
        schedule: CosineSchedule,
        num_steps: int,
        prediction: Prediction = "v",
        thresholding: Callable[[Tensor], Tensor] | None = None,
        timesteps: Tensor | None = None,
    ) -> None:
        if prediction not in ("v", "eps", "x0"):
            raise ValueError(f"unknown prediction {prediction!r}; expected one of v, eps, x0")
        self.schedule = schedule
        self.prediction = prediction
        self.thresholding = thresholding
        if timesteps is None:
            self.timesteps = uniform_timesteps(num_steps)
        else:
            ts = torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu()
            if ts.ndim != 1 or len(ts) != num_steps:
                raise ValueError(
                    f"timesteps must be 1-D with num_steps = {num_steps} entries, got shape {tuple(ts.shape)}"
                )
            if not bool((ts[1:] < ts[:-1]).all()) or ts[0] > 1.0 or ts[-1] <= 0.0:
                raise ValueError("timesteps must be strictly descending times in (0, 1]")
            self.timesteps = ts
        self.num_steps = len(self.timesteps)
        self.reset()

    def reset(self) -> None:
        """Forget any state kept between steps; call before a new sampling run (no-op if stateless)."""

    def index_of(self, t: float | Tensor) -> int:
        """Position of time t in `timesteps`; t must be one of the grid times (float32 rounding ok)."""
        t = float(t)
        diffs = (self.timesteps - t).abs()
        index = int(torch.argmin(diffs))
        if float(diffs[index]) > 1e-6:
            raise ValueError(f"t = {t} is not one of this sampler's timesteps {self.timesteps.tolist()}")
        return index

    def _coeffs(self, t: float) -> tuple[float, float, float]:
        """(alpha, sigma, logsnr) at a single time, as python floats computed in float64."""
        logsnr = self.schedule.logsnr(torch.tensor(t, dtype=torch.float64))
        alpha = float(torch.sigmoid(logsnr).sqrt())
        sigma = float(torch.sigmoid(-logsnr).sqrt())
        return alpha, sigma, float(logsnr)

    def step(
        self,
        model_output: Tensor,
        t: float | Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Move `sample` from grid time t to the next grid time (or to t = 0 at the last step)."""
        index = self.index_of(t)
        t_now = float(self.timesteps[index])
        alpha, sigma, logsnr = self._coeffs(t_now)
        x0, eps = to_x0_eps(model_output, sample, alpha, sigma, self.prediction)
        if self.thresholding is not None:
            # Re-derive eps from the thresholded x0 so the update stays consistent with x_t
            # (as in the ancestral sampler, whose posterior mean uses x_t and x0 only).
            x0 = self.thresholding(x0)
            eps = (sample - alpha * x0) / sigma
        if index == self.num_steps - 1:
            self.reset()
            return x0
        s_next = float(self.timesteps[index + 1])
        return self._move(index, x0, eps, sample, (alpha, sigma, logsnr), self._coeffs(s_next), generator)

    def _move(
        self,
        index: int,
        x0: Tensor,
        eps: Tensor,
        sample: Tensor,
        now: tuple[float, float, float],
        nxt: tuple[float, float, float],
        generator: torch.Generator | None,
    ) -> Tensor:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------
# DDPM and DDIM
# ----------------------------------------------------------------------------------------------------


class DDPMSampler(Sampler):
    """Ancestral sampler: draw x_s from the forward-process posterior q(x_s | x_t, x0 = x0_hat).

    With r = snr(t)/snr(s) = exp(logsnr_t - logsnr_s) < 1 the posterior is
    mean = r·(alpha_s/alpha_t)·x_t + (1 - r)·alpha_s·x0, variance = (1 - r)·sigma_s². Noise comes
    from `generator`; the last step (to t = 0) adds none.
    """

    def _move(self, index, x0, eps, sample, now, nxt, generator):
        alpha_t, _, logsnr_t = now
        alpha_s, sigma_s, logsnr_s = nxt
        r = math.exp(logsnr_t - logsnr_s)
        one_minus_r = -math.expm1(logsnr_t - logsnr_s)
        mean = (r * alpha_s / alpha_t) * sample + (one_minus_r * alpha_s) * x0
        std = math.sqrt(one_minus_r) * sigma_s
        return mean + std * gaussian_like(sample, generator)


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021): x_s = alpha_s·x0 + sqrt(sigma_s² - c²)·eps + c·noise.

    c² = eta²·(1 - r)·sigma_s² with r = snr(t)/snr(s): eta = 0 gives the deterministic sampler (an
    Euler step of the probability-flow ODE in log-SNR), eta = 1 reproduces DDPM's posterior. Noise is
    drawn only when eta > 0.
    """

    def __init__(
        self,
        schedule: CosineSchedule,
        num_steps: int,
        prediction: Prediction = "v",
        thresholding: Callable[[Tensor], Tensor] | None = None,
        timesteps: Tensor | None = None,
        eta: float = 0.0,
    ) -> None:
        super().__init__(schedule, num_steps, prediction, thresholding, timesteps)
        if eta < 0:
            raise ValueError(f"eta must be non-negative, got {eta}")
        self.eta = float(eta)

    def _move(self, index, x0, eps, sample, now, nxt, generator):
        _, _, logsnr_t = now
        alpha_s, sigma_s, logsnr_s = nxt
        one_minus_r = -math.expm1(logsnr_t - logsnr_s)
        c2 = self.eta**2 * one_minus_r  # in units of sigma_s²
        direction = sigma_s * math.sqrt(max(1.0 - c2, 0.0))
        out = alpha_s * x0 + direction * eps
        if self.eta > 0:
            out = out + (sigma_s * math.sqrt(c2)) * gaussian_like(sample, generator)
        return out


# ----------------------------------------------------------------------------------------------------
# DPM-Solver++(2M)
# ----------------------------------------------------------------------------------------------------


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022): multistep second-order ODE solver in x0-prediction form.

    Works in lambda = logsnr/2 = log(alpha/sigma). With h = lambda_s - lambda_t it updates
    x_s = (sigma_s/sigma_t)·x_t - alpha_s·(exp(-h) - 1)·D, where D = x0 at first order and, using the
    previous step's x0 prediction (step size h_prev, r = h_prev/h),
    D = (1 + 1/(2r))·x0 - (1/(2r))·x0_prev at second order. The first step has no history and the last
    step (to t = 0) returns x0, so both are first order.

    The previous x0 is kept between calls: the state resets automatically at the first grid time and
    after the final step; call `reset()` when abandoning a run midway. If steps are taken out of order
    the update falls back to first order instead of mixing in a stale prediction.
    """

    def reset(self) -> None:
        """Drop the stored previous x0 prediction (start of a new sampling run)."""
        self._prev_x0: Tensor | None = None
        self._prev_index: int = -1
        self._prev_lambda: float = 0.0

    def _move(self, index, x0, eps, sample, now, nxt, generator):
        if index == 0:
            self.reset()
        _, sigma_t, logsnr_t = now
        alpha_s, sigma_s, logsnr_s = nxt
        lambda_t, lambda_s = 0.5 * logsnr_t, 0.5 * logsnr_s
        h = lambda_s - lambda_t
        if self._prev_x0 is not None and self._prev_index == index - 1:
            r = (lambda_t - self._prev_lambda) / h
            d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * self._prev_x0
        else:
            d = x0
        self._prev_x0, self._prev_index, self._prev_lambda = x0, index, lambda_t
        return (sigma_s / sigma_t) * sample - (alpha_s * math.expm1(-h)) * d


# ----------------------------------------------------------------------------------------------------
# Factory and loop
# ----------------------------------------------------------------------------------------------------


def make_sampler(
    name: SamplerName,
    schedule: CosineSchedule,
    num_steps: int,
    prediction: Prediction = "v",
    eta: float = 0.0,
    thresholding: Callable[[Tensor], Tensor] | None = None,
    timesteps: Tensor | None = None,
) -> Sampler:
    """Build a sampler by its config name; `eta` is used by "ddim" only."""
    if name == "ddpm":
        return DDPMSampler(schedule, num_steps, prediction, thresholding, timesteps)
    if name == "ddim":
        return DDIMSampler(schedule, num_steps, prediction, thresholding, timesteps, eta=eta)
    if name == "dpmpp_2m":
        return DPMSolverPP2MSampler(schedule, num_steps, prediction, thresholding, timesteps)
    raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLER_NAMES)}")


def sample_loop(
    model_fn: Callable[..., Tensor],
    sampler: Sampler,
    noise: Tensor,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **model_kwargs: Any,
) -> Tensor:
    """Run every sampler step from `noise` (the sample at t = 1) and return the clean sample.

    model_fn(x, t_batch, **model_kwargs) is called once per step with t_batch a (B,) tensor filled
    with the current time (float32, or float64 for float64 samples).
    """
    sampler.reset()
    x = noise
    t_dtype = torch.promote_types(noise.dtype, torch.float32)
    times = sampler.timesteps.tolist()
    if progress:
        from tqdm.auto import tqdm

        times = tqdm(times, desc=f"sampling ({type(sampler).__name__})", unit="step")
    for t in times:
        t_batch = torch.full((noise.shape[0],), t, dtype=t_dtype, device=noise.device)
        out = model_fn(x, t_batch, **model_kwargs)
        x = sampler.step(out, t, x, generator=generator)
    return x
