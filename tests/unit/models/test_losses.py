"""Loss tests: oracle models, Min-SNR weighting against an independent x0-space formula, per-frame t."""

from __future__ import annotations

import pytest
import torch

from models.diffusion.losses import training_loss
from models.diffusion.schedules import CosineSchedule

SCHEDULE = CosineSchedule(shift=-0.5)
SHAPE = (3, 2, 4, 5, 5)  # (B, C, T, H, W)


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return x0, noise, g


def expand(c: torch.Tensor) -> torch.Tensor:
    """Independent broadcast for the tests: (B,) or (B, T) -> (B, 1, T or 1, 1, 1)."""
    return c.reshape(c.shape[0], 1, -1, 1, 1)


def oracle(x0: torch.Tensor, noise: torch.Tensor, prediction: str):
    """A model that knows x0 and the noise and returns the exact target."""

    def fn(x_t, t):
        alpha, sigma = SCHEDULE.alpha_sigma(t)
        a, s = expand(alpha), expand(sigma)
        return {"v": a * noise - s * x0, "eps": noise, "x0": x0}[prediction]

    return fn


@pytest.mark.parametrize("prediction", ["v", "eps", "x0"])
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
@pytest.mark.parametrize("per_frame", [False, True])
def test_oracle_model_has_zero_loss(prediction, weighting, per_frame):
    x0, noise, g = data()
    t = torch.rand(3, 4, generator=g) if per_frame else torch.rand(3, generator=g)
    loss = training_loss(oracle(x0, noise, prediction), x0, t, noise, SCHEDULE, prediction, weighting)
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-20)


def x0_from_output(output, x_t, t, prediction):
    """Hand-written inversion, kept separate from the library's to_x0_eps on purpose."""
    alpha, sigma = SCHEDULE.alpha_sigma(t)
    a, s = expand(alpha), expand(sigma)
    if prediction == "v":
        return a * x_t - s * output
    if prediction == "eps":
        return (x_t - s * output) / a
    return output


@pytest.mark.parametrize("prediction", ["v", "eps", "x0"])
@pytest.mark.parametrize("per_frame", [False, True])
def test_min_snr_equals_clipped_snr_times_x0_mse(prediction, per_frame):
    x0, noise, g = data(1)
    t = torch.rand(3, 4, generator=g, dtype=torch.float64) if per_frame else torch.rand(3, generator=g)
    t = t.to(torch.float64)
    t[0] = 0.05  # snr above gamma: the weight is clipped
    outputs = {}

    def model(x_t, tt):
        out = torch.randn(x_t.shape, generator=g, dtype=x_t.dtype)
        outputs["x_t"], outputs["out"] = x_t, out
        return out

    gamma = 5.0
    loss = training_loss(model, x0, t, noise, SCHEDULE, prediction, "min_snr", min_snr_gamma=gamma)
    x0_hat = x0_from_output(outputs["out"], outputs["x_t"], t, prediction)
    snr = torch.exp(SCHEDULE.logsnr(t))
    assert float(snr.max()) > gamma and float(snr.min()) < gamma  # both branches exercised
    expected = (expand(torch.clamp(snr, max=gamma)) * (x0_hat - x0) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)


def test_no_weighting_is_plain_target_mse():
    x0, noise, g = data(2)
    t = torch.rand(3, generator=g, dtype=torch.float64)
    out = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    loss = training_loss(lambda x_t, tt: out, x0, t, noise, SCHEDULE, "v")
    alpha, sigma = SCHEDULE.alpha_sigma(t)
    target = expand(alpha) * noise - expand(sigma) * x0
    torch.testing.assert_close(loss, ((out - target) ** 2).flatten(1).mean(1))


def test_per_frame_loss_is_mean_of_independent_frame_losses():
    """Frames with their own times behave like separate one-frame samples."""
    x0, noise, g = data(3)
    t = torch.rand(3, 4, generator=g, dtype=torch.float64)
    w = torch.randn(1, 2, 1, 1, 1, generator=g, dtype=torch.float64)
    model = lambda x_t, tt: w * torch.tanh(x_t)  # noqa: E731 -- acts on each frame independently
    loss = training_loss(model, x0, t, noise, SCHEDULE, "eps", "min_snr")
    frame_losses = [
        training_loss(model, x0[:, :, f : f + 1], t[:, f], noise[:, :, f : f + 1], SCHEDULE, "eps", "min_snr")
        for f in range(4)
    ]
    torch.testing.assert_close(loss, torch.stack(frame_losses).mean(0))


def test_model_receives_t_and_kwargs_and_gradients_flow():
    x0, noise, g = data(4)
    t = torch.rand(3, 4, generator=g)
    weight = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    seen = {}

    def model(x_t, tt, text=None):
        seen["t"], seen["text"] = tt, text
        return weight * x_t

    loss = training_loss(model, x0, t, noise, SCHEDULE, text="a cat")
    loss.mean().backward()
    assert seen["text"] == "a cat" and seen["t"] is t
    assert weight.grad is not None and float(weight.grad.abs()) > 0


def test_errors():
    x0, noise, g = data(5)
    t = torch.rand(3, generator=g)
    model = lambda x_t, tt: x_t  # noqa: E731
    with pytest.raises(ValueError, match=r"'p2'.*none, min_snr"):
        training_loss(model, x0, t, noise, SCHEDULE, weighting="p2")
    with pytest.raises(ValueError, match=r"'score'.*v, eps, x0"):
        training_loss(model, x0, t, noise, SCHEDULE, prediction="score")
    with pytest.raises(ValueError, match=r"'score'.*v, eps, x0"):
        training_loss(model, x0, t, noise, SCHEDULE, prediction="score", weighting="min_snr")
    with pytest.raises(ValueError, match="model output shape"):
        training_loss(lambda x_t, tt: x_t[:, :1], x0, t, noise, SCHEDULE)
