"""Super-resolution degradations and upsampling (the conditioning of TSR/SSR stages)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.superres import degrade, downsample_video, reduce_video, upsample_video


def _pil_resize(frame: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Independent reference: PIL's antialiased bicubic resize of one (H, W) float channel."""
    image = Image.fromarray(frame.numpy().astype(np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.BICUBIC))


def test_temporal_upsampling_repeats_frames():
    low = torch.randn(2, 3, 4, 8, 8)
    up = upsample_video(low, 12, 8, 8)
    assert up.shape == (2, 3, 12, 8, 8)
    for t in range(12):
        assert torch.equal(up[:, :, t], low[:, :, t // 3])


def test_spatial_upsampling_is_bicubic_per_frame_clamped():
    low = torch.rand(2, 3, 3, 6, 5) * 2 - 1
    up = upsample_video(low, 3, 12, 20)
    for t in range(3):
        expected = F.interpolate(low[:, :, t], size=(12, 20), mode="bicubic", align_corners=False)
        torch.testing.assert_close(up[:, :, t], expected.clamp(-1, 1))
    assert up.min() >= -1 and up.max() <= 1  # bicubic overshoot at edges is clipped to the pixel range
    constant = torch.full((1, 3, 2, 4, 4), 0.25)
    torch.testing.assert_close(upsample_video(constant, 4, 16, 16), torch.full((1, 3, 4, 16, 16), 0.25))


def test_ssr_downsampling_is_antialiased_like_pil():
    x = torch.rand(1, 1, 2, 32, 24) * 2 - 1
    low = downsample_video(x, "ssr", 4)
    assert low.shape == (1, 1, 2, 8, 6)
    for t in range(2):
        np.testing.assert_allclose(low[0, 0, t].numpy(), _pil_resize(x[0, 0, t], 8, 6), atol=2e-3)
    # antialiasing: a pixel-scale checkerboard averages out instead of aliasing to a solid colour
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * 2.0 - 1.0
    low = downsample_video(checker.expand(1, 1, 1, 16, 16), "ssr", 4)
    assert low.abs().max() < 0.05


def test_tsr_keeps_every_kth_frame_and_degrade_repeats_it():
    x = torch.randn(2, 3, 8, 4, 4)
    assert torch.equal(downsample_video(x, "tsr", 2), x[:, :, ::2])
    cond = degrade(x, "tsr", 4)
    assert cond.shape == x.shape
    for t in range(8):
        assert torch.equal(cond[:, :, t], x[:, :, (t // 4) * 4])


def test_ssr_degrade_keeps_the_shape_and_loses_detail():
    x = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    cond = degrade(x, "ssr", 2)
    assert cond.shape == x.shape
    smooth = torch.linspace(-0.5, 0.5, 16).expand(1, 3, 2, 16, 16)  # a ramp survives almost unchanged
    assert (degrade(smooth, "ssr", 2) - smooth)[..., 2:-2, 2:-2].abs().max() < 0.02
    assert (cond - x).abs().mean() > 0.2  # white noise does not


def test_reduce_video_strides_frames_and_resizes():
    x = torch.rand(1, 3, 8, 32, 32) * 2 - 1
    out = reduce_video(x, 4, 16, 16)
    assert out.shape == (1, 3, 4, 16, 16)
    torch.testing.assert_close(out, downsample_video(x[:, :, ::2], "ssr", 2))
    assert torch.equal(reduce_video(x, 8, 32, 32), x)


def test_errors():
    with pytest.raises(ValueError, match="whole multiple"):
        upsample_video(torch.randn(1, 3, 4, 8, 8), 6, 8, 8)
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        upsample_video(torch.randn(3, 4, 8, 8), 4, 8, 8)
    with pytest.raises(ValueError, match="not a whole multiple of 2"):
        downsample_video(torch.randn(1, 3, 5, 8, 8), "tsr", 2)
    with pytest.raises(ValueError, match="not divisible by 3"):
        downsample_video(torch.randn(1, 3, 4, 8, 8), "ssr", 3)
    with pytest.raises(ValueError, match="unknown"):
        downsample_video(torch.randn(1, 3, 4, 8, 8), "base", 2)
    with pytest.raises(ValueError, match="can only be shortened"):
        reduce_video(torch.randn(1, 3, 4, 8, 8), 4, 16, 16)
