"""Conditioning augmentation tests: exact identity at level 0, noise statistics, level sampling."""

from __future__ import annotations

import pytest
import torch

from models.diffusion.augment import augment_condition, sample_augment_levels
from models.diffusion.schedules import CosineSchedule

SCHEDULE = CosineSchedule()


def test_level_zero_is_exact_identity():
    cond = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    out = augment_condition(cond, torch.zeros(2), SCHEDULE, torch.Generator().manual_seed(1))
    assert torch.equal(out, cond)


def test_mixed_levels_only_touch_nonzero_samples():
    cond = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    out = augment_condition(cond, torch.tensor([0.0, 0.5]), SCHEDULE, torch.Generator().manual_seed(1))
    assert torch.equal(out[0], cond[0])
    assert not torch.allclose(out[1], cond[1], atol=1e-2)


@pytest.mark.parametrize("level", [0.2, 0.6])
def test_noise_statistics_match_alpha_and_sigma(level):
    c = 0.7
    cond = torch.full((2, 1, 8, 64, 64), c, dtype=torch.float64)
    out = augment_condition(cond, torch.full((2,), level), SCHEDULE, torch.Generator().manual_seed(2))
    alpha, sigma = SCHEDULE.alpha_sigma(torch.tensor(level, dtype=torch.float64))
    n = out[0].numel()
    for b in range(2):
        # mean within 5 standard errors, std within a few percent
        assert abs(float(out[b].mean()) - float(alpha) * c) < 5 * float(sigma) / n**0.5
        assert float(out[b].std()) == pytest.approx(float(sigma), rel=0.03)


def test_seeded_and_scalar_level():
    cond = torch.randn(3, 2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = augment_condition(cond, 0.375, SCHEDULE, torch.Generator().manual_seed(5))
    b = augment_condition(cond, torch.full((3,), 0.375), SCHEDULE, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        augment_condition(cond, torch.zeros(2), SCHEDULE)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        augment_condition(cond, torch.full((3,), 1.5), SCHEDULE)


def test_sample_augment_levels_uniform_in_range():
    levels = sample_augment_levels(20000, 0.4, torch.Generator().manual_seed(0))
    assert levels.shape == (20000,)
    assert float(levels.min()) >= 0.0 and float(levels.max()) <= 0.4
    assert float(levels.mean()) == pytest.approx(0.2, abs=0.005)
    assert float(levels.std()) == pytest.approx(0.4 / 12**0.5, rel=0.03)
    again = sample_augment_levels(20000, 0.4, torch.Generator().manual_seed(0))
    assert torch.equal(levels, again)
    assert bool((sample_augment_levels(5, 0.0) == 0).all())
    with pytest.raises(ValueError, match="max_level"):
        sample_augment_levels(4, 1.5)
