"""Schedule tests: endpoints, monotonicity, variance preservation, inversion, shifts, broadcasting."""

from __future__ import annotations

import math

import pytest
import torch

from models.diffusion.schedules import (
    CosineSchedule,
    broadcast_like,
    size_shift,
    to_x0_eps,
    training_target,
)

T_GRID = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)


@pytest.mark.parametrize(("lo", "hi"), [(-15.0, 15.0), (-20.0, 10.0)])
def test_logsnr_endpoints(lo, hi):
    sched = CosineSchedule(logsnr_min=lo, logsnr_max=hi)
    assert float(sched.logsnr(0.0)) == pytest.approx(hi, abs=1e-9)
    assert float(sched.logsnr(1.0)) == pytest.approx(lo, abs=1e-9)


def test_logsnr_strictly_decreasing():
    lam = CosineSchedule().logsnr(T_GRID)
    assert bool((lam[1:] < lam[:-1]).all())


def test_alpha_sigma_variance_preserving_and_match_cosine_form():
    sched = CosineSchedule()
    alpha, sigma = sched.alpha_sigma(T_GRID)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(T_GRID), rtol=0, atol=1e-12)
    assert bool((alpha > 0).all()) and bool((sigma > 0).all())  # truncation keeps both invertible
    # Without shift, tan(a·t + b) = sigma/alpha, so alpha = cos(a·t + b) and sigma = sin(a·t + b).
    b = math.atan(math.exp(-7.5))
    a = math.atan(math.exp(7.5)) - b
    torch.testing.assert_close(alpha, torch.cos(a * T_GRID + b), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sigma, torch.sin(a * T_GRID + b), rtol=1e-9, atol=1e-12)


def test_alpha_sigma_keep_float32_dtype():
    alpha, sigma = CosineSchedule().alpha_sigma(torch.rand(4))
    assert alpha.dtype == torch.float32 and sigma.dtype == torch.float32


@pytest.mark.parametrize("shift", [0.0, -2.7, 1.5])
def test_t_from_logsnr_inverts_logsnr(shift):
    sched = CosineSchedule(shift=shift)
    torch.testing.assert_close(sched.t_from_logsnr(sched.logsnr(T_GRID)), T_GRID, rtol=0, atol=1e-10)
    lam = torch.linspace(-14.0, 14.0, 57, dtype=torch.float64) + shift
    torch.testing.assert_close(sched.logsnr(sched.t_from_logsnr(lam)), lam, rtol=0, atol=1e-9)


def test_shift_moves_logsnr_by_exactly_shift():
    base, shifted = CosineSchedule(), CosineSchedule(shift=-1.25)
    torch.testing.assert_close(shifted.logsnr(T_GRID) - base.logsnr(T_GRID), torch.full_like(T_GRID, -1.25))


def test_size_shift_sign_and_value():
    assert size_shift(64 * 64, 32 * 32) == pytest.approx(-2 * math.log(2))  # bigger: more noise
    assert size_shift(16 * 16, 32 * 32) == pytest.approx(2 * math.log(2))
    assert size_shift(8 * 32 * 32, 8 * 32 * 32) == 0.0
    # A video of T frames counts T times the elements of one frame.
    assert size_shift(16 * 32 * 32, 32 * 32) == pytest.approx(-math.log(16))
    # Bigger inputs get a lower logsnr (noisier) at every t.
    sched = CosineSchedule(shift=size_shift(64 * 64, 32 * 32))
    assert bool((sched.logsnr(T_GRID) < CosineSchedule().logsnr(T_GRID)).all())
    with pytest.raises(ValueError, match="positive"):
        size_shift(0, 10)


def test_broadcast_like_shapes():
    x = torch.zeros(2, 3, 4, 5, 6)
    assert broadcast_like(torch.ones(2), x).shape == (2, 1, 1, 1, 1)
    assert broadcast_like(torch.ones(2, 4), x).shape == (2, 1, 4, 1, 1)
    assert broadcast_like(torch.ones(2), torch.zeros(2, 7, 3)).shape == (2, 1, 1)
    assert broadcast_like(0.5, x) == 0.5
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        broadcast_like(torch.ones(2, 4), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="T = 3"):
        broadcast_like(torch.ones(2, 3), x)
    with pytest.raises(ValueError, match="batch size"):
        broadcast_like(torch.ones(3), x)


def test_add_noise_per_frame_times_treat_frames_independently():
    sched = CosineSchedule()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 5, 5, generator=g), torch.randn(2, 3, 4, 5, 5, generator=g)
    t = torch.rand(2, 4, generator=g)  # (B, T): one time per frame
    x_t = sched.add_noise(x0, noise, t)
    assert x_t.shape == x0.shape
    for f in range(4):
        frame = sched.add_noise(x0[:, :, f : f + 1], noise[:, :, f : f + 1], t[:, f])
        torch.testing.assert_close(x_t[:, :, f : f + 1], frame)


@pytest.mark.parametrize("prediction", ["v", "eps", "x0"])
def test_targets_roundtrip_through_to_x0_eps(prediction):
    sched = CosineSchedule()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, 2, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 2, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    alpha, sigma = sched.alpha_sigma(t)
    x_t = sched.add_noise(x0, noise, t)
    target = training_target(x0, noise, alpha, sigma, prediction)
    x0_hat, eps_hat = to_x0_eps(target, x_t, alpha, sigma, prediction)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, noise)


def test_v_target_formula():
    x0, noise = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]])
    alpha, sigma = torch.tensor([0.6]), torch.tensor([0.8])
    expected = torch.tensor([[0.6 * 0.5 - 0.8 * 1.0, 0.6 * -1.0 - 0.8 * 2.0]])
    torch.testing.assert_close(training_target(x0, noise, alpha, sigma, "v"), expected)


def test_unknown_prediction_names_it_and_the_valid_ones():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"'score'.*v, eps, x0"):
        training_target(x, x, 1.0, 0.0, "score")
    with pytest.raises(ValueError, match=r"'sample'.*v, eps, x0"):
        to_x0_eps(x, x, 1.0, 0.0, "sample")


def test_invalid_logsnr_range():
    with pytest.raises(ValueError, match="logsnr_min"):
        CosineSchedule(logsnr_min=5.0, logsnr_max=-5.0)


def test_schedule_from_config_applies_the_size_shift():
    from configs import DiffusionConfig

    plain = CosineSchedule.from_config(DiffusionConfig(logsnr_min=-10.0, logsnr_max=12.0), numel=16 * 64 * 64)
    assert (plain.logsnr_min, plain.logsnr_max, plain.shift) == (-10.0, 12.0, 0.0)
    cfg = DiffusionConfig(shift_reference_numel=64 * 64)
    shifted = CosineSchedule.from_config(cfg, numel=16 * 64 * 64)
    assert math.isclose(shifted.shift, -math.log(16))
    unshifted = CosineSchedule.from_config(DiffusionConfig(), numel=16 * 64 * 64)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    torch.testing.assert_close(shifted.logsnr(t), unshifted.logsnr(t) - math.log(16))
