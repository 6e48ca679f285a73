"""Upsampling of the super-resolution conditioning video."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.superres import upsample_video


def test_temporal_upsampling_repeats_frames():
    low = torch.randn(2, 3, 4, 8, 8)
    up = upsample_video(low, 12, 8, 8)
    assert up.shape == (2, 3, 12, 8, 8)
    for t in range(12):
        assert torch.equal(up[:, :, t], low[:, :, t // 3])


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_spatial_upsampling_per_frame(mode):
    low = torch.randn(2, 3, 3, 6, 5)
    up = upsample_video(low, 3, 12, 20, mode)
    for t in range(3):
        expected = F.interpolate(low[:, :, t], size=(12, 20), mode=mode, align_corners=False)
        torch.testing.assert_close(up[:, :, t], expected)
    constant = torch.full((1, 3, 2, 4, 4), 0.25)
    torch.testing.assert_close(upsample_video(constant, 4, 16, 16, mode), torch.full((1, 3, 4, 16, 16), 0.25))


def test_errors():
    with pytest.raises(ValueError, match="whole multiple"):
        upsample_video(torch.randn(1, 3, 4, 8, 8), 6, 8, 8)
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        upsample_video(torch.randn(3, 4, 8, 8), 4, 8, 8)
    with pytest.raises(ValueError, match="nearest"):
        upsample_video(torch.randn(1, 3, 4, 8, 8), 4, 16, 16, "nearest")  # type: ignore[arg-type]
