"""Sampler tests: equivalence with diffusers' schedulers, ODE consistency, oracle denoisers.

Cross-check recipe (diffusers is a test-only reference):

- Discretize our continuous schedule into N = 1000 training steps: alphas_cumprod[i] = alpha(t_i)² with
  t_i = (i + 1)/N, and hand diffusers the betas whose cumulative product reproduces it
  (beta_0 = 1 - alphas_cumprod[0], beta_i = 1 - alphas_cumprod[i]/alphas_cumprod[i-1]).
  So diffusers' integer timestep k is our continuous time t = (k + 1)/N.
- timestep_spacing="trailing" gives diffusers timesteps N - 1 - i·N/n, i.e. our uniform grid
  t_i = 1 - i/n exactly when n divides N (for other n we pass diffusers' grid via `timesteps=`).
- The final step must go to clean data: DDIM set_alpha_to_one=True, DPM-Solver++ final_sigmas_type="zero"
  (which also forces a first-order final step), DDPM's last step has alpha_prod_prev = 1. clip_sample=False.
- diffusers stores its tables in float32 (trained_betas are cast to float32, DPM-Solver's sigmas too).
  To compare trajectories at float64 precision we rebuild those tables in float64 from the same betas,
  exactly as diffusers' __init__/set_timesteps derive them (`_float64_tables`); a separate check runs
  diffusers untouched in float32 with a looser tolerance. DPM-Solver also casts the sample to float32
  inside `step`, which bounds its agreement to ~1e-6.
"""

from __future__ import annotations

import pytest
import torch

from models.diffusion.guidance import dynamic_threshold
from models.diffusion.samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    make_sampler,
    sample_loop,
    uniform_timesteps,
)
from models.diffusion.schedules import CosineSchedule, broadcast_like

diffusers = pytest.importorskip("diffusers")

N_TRAIN = 1000
SCHEDULE = CosineSchedule()
DIFFUSERS_PREDICTION = {"v": "v_prediction", "eps": "epsilon", "x0": "sample"}
SHAPE = (2, 3, 2, 4, 4)  # (B, C, T, H, W)


def our_alphas_cumprod() -> torch.Tensor:
    t = torch.arange(1, N_TRAIN + 1, dtype=torch.float64) / N_TRAIN
    alpha, _ = SCHEDULE.alpha_sigma(t)
    return alpha**2


def betas_from_alphas_cumprod(ac: torch.Tensor) -> torch.Tensor:
    ratios = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - ratios


def toy_denoiser(prediction: str):
    """A fixed smooth nonlinear x0 estimate of (x, t), returned in the requested parameterization."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tb = broadcast_like(t.to(x.dtype), x)
        x0 = 0.6 * torch.tanh(1.3 * x) + 0.1 * torch.sin(2.0 * x) * tb + 0.05 * tb
        alpha, sigma = SCHEDULE.alpha_sigma(t.to(torch.float64))
        alpha, sigma = broadcast_like(alpha.to(x.dtype), x), broadcast_like(sigma.to(x.dtype), x)
        if prediction == "v":
            return (alpha * x - x0) / sigma
        if prediction == "eps":
            return (x - alpha * x0) / sigma
        return x0

    return fn


def _float64_tables(sched) -> None:
    """Rebuild diffusers' float32 tables in float64 from the same betas (same formulas as its __init__)."""
    betas = betas_from_alphas_cumprod(our_alphas_cumprod())
    sched.betas = betas
    sched.alphas = 1.0 - betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
    if hasattr(sched, "one"):
        sched.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)


def _dpm_sigmas_float64(sched) -> None:
    """Replace the float32 sigmas set_timesteps computed with float64 ones at the same timesteps."""
    ac = sched.alphas_cumprod
    sig = ((1.0 - ac) / ac).sqrt()[sched.timesteps]
    sched.sigmas = torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


def run_diffusers(sched, prediction: str, noise: torch.Tensor, generator=None) -> list[torch.Tensor]:
    model = toy_denoiser(prediction)
    x, traj = noise.clone(), []
    for k in sched.timesteps:
        t = torch.full((x.shape[0],), (int(k) + 1) / N_TRAIN, dtype=torch.float64)
        x = sched.step(model(x, t), k, x, generator=generator).prev_sample
        traj.append(x)
    return traj


def run_ours(sampler, prediction: str, noise: torch.Tensor, generator=None) -> list[torch.Tensor]:
    model = toy_denoiser(prediction)
    sampler.reset()
    x, traj = noise.clone(), []
    for t in sampler.timesteps.tolist():
        x = sampler.step(model(x, torch.full((x.shape[0],), t, dtype=torch.float64)), t, x, generator)
        traj.append(x)
    return traj


def assert_trajectories_close(ours, theirs, rtol: float, atol: float) -> None:
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b.to(torch.float64), rtol=rtol, atol=atol, msg=f"step {i}")


def initial_noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------
# Equivalence with diffusers
# ----------------------------------------------------------------------------------------------------


def test_discretized_schedule_matches_diffusers_alphas_cumprod():
    ours = our_alphas_cumprod()
    betas = betas_from_alphas_cumprod(ours)
    for cls in (diffusers.DDIMScheduler, diffusers.DPMSolverMultistepScheduler, diffusers.DDPMScheduler):
        sched = cls(num_train_timesteps=N_TRAIN, trained_betas=betas.numpy())
        # diffusers keeps float32 tables: equal to float32 accuracy (cumulative product of 1000 terms).
        torch.testing.assert_close(sched.alphas_cumprod.double(), ours, rtol=2e-5, atol=2e-7)
        _float64_tables(sched)
        torch.testing.assert_close(sched.alphas_cumprod, ours, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("prediction", ["v", "eps", "x0"])
@pytest.mark.parametrize("num_steps", [10, 25])
def test_ddim_matches_diffusers(prediction, num_steps):
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=N_TRAIN,
        trained_betas=betas_from_alphas_cumprod(our_alphas_cumprod()).numpy(),
        prediction_type=DIFFUSERS_PREDICTION[prediction],
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )
    _float64_tables(sched)
    sched.set_timesteps(num_steps)
    ours = DDIMSampler(SCHEDULE, num_steps, prediction=prediction)
    torch.testing.assert_close((sched.timesteps.double() + 1) / N_TRAIN, ours.timesteps, rtol=0, atol=1e-12)
    noise = initial_noise()
    assert_trajectories_close(
        run_ours(ours, prediction, noise), run_diffusers(sched, prediction, noise), rtol=1e-12, atol=1e-12
    )


def test_ddim_matches_untouched_float32_diffusers():
    """Without rebuilding diffusers' tables in float64 the agreement is limited by float32 betas."""
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=N_TRAIN,
        trained_betas=betas_from_alphas_cumprod(our_alphas_cumprod()).numpy(),
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )
    sched.set_timesteps(20)
    noise = initial_noise(3)
    theirs = run_diffusers(sched, "v", noise)
    ours = run_ours(DDIMSampler(SCHEDULE, 20, prediction="v"), "v", noise)
    torch.testing.assert_close(ours[-1], theirs[-1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("prediction", ["v", "eps", "x0"])
@pytest.mark.parametrize("num_steps", [10, 25])
def test_dpmpp_2m_matches_diffusers(prediction, num_steps):
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=N_TRAIN,
        trained_betas=betas_from_alphas_cumprod(our_alphas_cumprod()).numpy(),
        prediction_type=DIFFUSERS_PREDICTION[prediction],
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="trailing",
    )
    _float64_tables(sched)
    sched.set_timesteps(num_steps)
    _dpm_sigmas_float64(sched)
    ours = DPMSolverPP2MSampler(SCHEDULE, num_steps, prediction=prediction)
    torch.testing.assert_close((sched.timesteps.double() + 1) / N_TRAIN, ours.timesteps, rtol=0, atol=1e-12)
    noise = initial_noise(1)
    # diffusers casts the sample to float32 inside every step, hence the 1e-5 tolerance.
    assert_trajectories_close(
        run_ours(ours, prediction, noise), run_diffusers(sched, prediction, noise), rtol=1e-5, atol=1e-5
    )


def test_dpmpp_2m_matches_diffusers_on_nonuniform_grid():
    """n = 7 does not divide N: diffusers' rounded trailing grid is passed to ours explicitly."""
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=N_TRAIN,
        trained_betas=betas_from_alphas_cumprod(our_alphas_cumprod()).numpy(),
        prediction_type="v_prediction",
        final_sigmas_type="zero",
        timestep_spacing="trailing",
    )
    _float64_tables(sched)
    sched.set_timesteps(7)
    _dpm_sigmas_float64(sched)
    grid = (sched.timesteps.double() + 1) / N_TRAIN
    assert not torch.allclose(grid, uniform_timesteps(7))  # the explicit grid is really needed here
    ours = make_sampler("dpmpp_2m", SCHEDULE, 7, prediction="v", timesteps=grid)
    noise = initial_noise(2)
    assert_trajectories_close(
        run_ours(ours, "v", noise), run_diffusers(sched, "v", noise), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_ddpm_matches_diffusers_with_shared_generator(prediction):
    """Both draw torch.randn(sample.shape) from the generator once per non-final step, so the noise
    aligns exactly. diffusers also draws at its final step but scales it by sqrt(1e-20) (its variance
    clamp), which is far below the tolerance."""
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=N_TRAIN,
        trained_betas=betas_from_alphas_cumprod(our_alphas_cumprod()).numpy(),
        prediction_type=DIFFUSERS_PREDICTION[prediction],
        variance_type="fixed_small",
        clip_sample=False,
        timestep_spacing="trailing",
    )
    _float64_tables(sched)
    sched.set_timesteps(20)
    noise = initial_noise(4)
    theirs = run_diffusers(sched, prediction, noise, generator=torch.Generator().manual_seed(7))
    ours = run_ours(
        DDPMSampler(SCHEDULE, 20, prediction), prediction, noise, torch.Generator().manual_seed(7)
    )
    assert_trajectories_close(ours, theirs, rtol=1e-8, atol=1e-8)


# ----------------------------------------------------------------------------------------------------
# Internal consistency
# ----------------------------------------------------------------------------------------------------


def test_timesteps_uniform_descending():
    ts = make_sampler("ddim", SCHEDULE, 4).timesteps
    torch.testing.assert_close(ts, torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64))


def test_ddim_eta0_is_deterministic_and_ignores_generator():
    noise = initial_noise(5)
    a = sample_loop(toy_denoiser("v"), DDIMSampler(SCHEDULE, 12), noise, torch.Generator().manual_seed(0))
    b = sample_loop(toy_denoiser("v"), DDIMSampler(SCHEDULE, 12), noise, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_ddim_eta1_equals_ddpm():
    noise = initial_noise(6)
    a = sample_loop(
        toy_denoiser("eps"),
        DDIMSampler(SCHEDULE, 15, "eps", eta=1.0),
        noise,
        torch.Generator().manual_seed(3),
    )
    b = sample_loop(
        toy_denoiser("eps"), DDPMSampler(SCHEDULE, 15, "eps"), noise, torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_ddpm_is_stochastic_and_seeded():
    noise = initial_noise(8)
    run = lambda seed: sample_loop(  # noqa: E731
        toy_denoiser("v"), DDPMSampler(SCHEDULE, 8), noise, torch.Generator().manual_seed(seed)
    )
    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def gmm_denoiser_v(x: torch.Tensor, t: torch.Tensor, mus=(-0.5, 0.5), s: float = 0.3) -> torch.Tensor:
    """Exact v-prediction for data whose elements are i.i.d. 0.5·N(-0.5, s²) + 0.5·N(0.5, s²).

    Unlike `toy_denoiser` it is consistent (x0_hat -> x as t -> 0), so the probability-flow ODE has
    a well-defined end point that solvers must converge to; the toy keeps contracting as t -> 0 and
    its result depends on where the last step starts.
    """
    alpha, sigma = SCHEDULE.alpha_sigma(t)
    a, sg = broadcast_like(alpha.to(x.dtype), x), broadcast_like(sigma.to(x.dtype), x)
    var = a**2 * s**2 + sg**2  # marginal variance of x_t within one component
    resp = torch.softmax(torch.stack([-((x - a * m) ** 2) / (2 * var) for m in mus]), dim=0)
    x0 = sum(resp[k] * (m + a * s**2 / var * (x - a * m)) for k, m in enumerate(mus))
    return (a * x - x0) / sg


def test_dpmpp_2m_and_ddim_converge_to_the_same_ode_solution():
    noise = initial_noise(9)
    reference = sample_loop(gmm_denoiser_v, DDIMSampler(SCHEDULE, 2000), noise)
    dpm = sample_loop(gmm_denoiser_v, DPMSolverPP2MSampler(SCHEDULE, 200), noise)
    torch.testing.assert_close(dpm, reference, rtol=0, atol=3e-3)
    # Second order pays off at small step counts: DPM-Solver++(2M) is far closer than DDIM at 20 steps.
    err_dpm = (sample_loop(gmm_denoiser_v, DPMSolverPP2MSampler(SCHEDULE, 20), noise) - reference).abs().max()
    err_ddim = (sample_loop(gmm_denoiser_v, DDIMSampler(SCHEDULE, 20), noise) - reference).abs().max()
    assert err_dpm < err_ddim / 3


def test_dpmpp_2m_reuse_gives_identical_runs():
    sampler = DPMSolverPP2MSampler(SCHEDULE, 10)
    noise = initial_noise(10)
    assert torch.equal(
        sample_loop(toy_denoiser("v"), sampler, noise), sample_loop(toy_denoiser("v"), sampler, noise)
    )


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("prediction", ["v", "eps", "x0"])
def test_oracle_denoiser_for_single_point_data_returns_it(name, prediction):
    """If the data is one point c, the ideal x0 prediction is c and every sampler must end at c."""
    c = torch.linspace(-0.9, 0.9, 2 * 3 * 2 * 4 * 4, dtype=torch.float64).reshape(SHAPE)

    def oracle(x, t):
        alpha, sigma = SCHEDULE.alpha_sigma(t)
        alpha, sigma = broadcast_like(alpha.to(x.dtype), x), broadcast_like(sigma.to(x.dtype), x)
        return {"v": (alpha * x - c) / sigma, "eps": (x - alpha * c) / sigma, "x0": c}[prediction]

    sampler = make_sampler(name, SCHEDULE, 6, prediction=prediction, eta=0.5)
    out = sample_loop(oracle, sampler, initial_noise(11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, c, rtol=0, atol=1e-9)


def test_thresholding_is_applied_to_the_final_prediction():
    seen = []

    def spy_threshold(x0):
        seen.append(x0)
        return dynamic_threshold(x0)

    def loud(x, t):  # x0 prediction far outside [-1, 1]
        return 5.0 * torch.ones_like(x)

    sampler = make_sampler("ddim", SCHEDULE, 4, prediction="x0", thresholding=spy_threshold)
    out = sample_loop(loud, sampler, initial_noise(12))
    assert len(seen) == 4
    torch.testing.assert_close(out, torch.ones_like(out))


def test_sample_loop_passes_batch_times_and_kwargs():
    calls = []

    def model(x, t, cond):
        calls.append((t.clone(), cond))
        return torch.zeros_like(x)

    sample_loop(model, make_sampler("ddim", SCHEDULE, 3), torch.zeros(2, 1, 1, 2, 2), cond="hello")
    assert [c[1] for c in calls] == ["hello"] * 3
    assert calls[0][0].shape == (2,) and calls[0][0].dtype == torch.float32
    torch.testing.assert_close(torch.stack([c[0][0] for c in calls]), torch.tensor([1.0, 2 / 3, 1 / 3]))


def test_errors():
    with pytest.raises(ValueError, match="ddpm, ddim, dpmpp_2m"):
        make_sampler("euler", SCHEDULE, 5)
    sampler = make_sampler("ddim", SCHEDULE, 5)
    with pytest.raises(ValueError, match="not one of"):
        sampler.step(torch.zeros(1, 2), 0.33, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="descending"):
        make_sampler("ddim", SCHEDULE, 3, timesteps=torch.tensor([0.2, 0.5, 1.0]))
    with pytest.raises(ValueError, match="prediction"):
        make_sampler("ddpm", SCHEDULE, 3, prediction="score")
