"""The FLOP counter against hand counts and against torch's own counter on a real forward."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from configs import model_config
from models.dit import VideoDiT
from models.flops import forward_flops, parameter_count


def test_attention_hand_counts():
    cfg = model_config("tiny", width=64, depth=3, patch_size=[1, 2, 2])
    frames, height, width, text = 8, 16, 32, 7
    tp, s = 8, (16 // 2) * (32 // 2)  # T' = 8, S = 8·16 = 128
    n = tp * s
    f = forward_flops(cfg, frames, height, width, text)
    assert f.spatial_attention == 3 * 4 * n * s * 64  # each frame: S queries over S keys
    assert f.temporal_attention == 3 * 4 * n * tp * 64  # each position: T' queries over T' keys
    assert f.cross_attention == 3 * 4 * n * text * 64
    image = forward_flops(cfg, 1, height, width, text)
    assert image.temporal_attention == 0  # T = 1 bypasses temporal attention
    mlp_per_block = 2 * n * 64 * 256 * 2
    no_mlp = forward_flops(model_config("tiny", depth=3, mlp_ratio=1.0), frames, height, width, text)
    assert f.linear - no_mlp.linear == 3 * (mlp_per_block - 2 * n * 64 * 64 * 2)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"kind": "ssr"}, {"temporal_layers": False}, {"patch_size": [2, 2, 2], "mlp_ratio": 2.0}],
)
def test_matches_torch_flop_counter(overrides):
    """torch counts every matmul of a real forward (naive attention is plain matmuls): totals agree."""
    cfg = model_config("tiny", attention_backend="naive", **overrides)
    model = VideoDiT(cfg)
    x = torch.randn(1, 3, 4, 8, 12)
    extra = {"cond": torch.randn_like(x), "cond_aug": torch.rand(1)} if cfg.kind != "base" else {}
    with FlopCounterMode(display=False) as counter:
        model(x, torch.rand(1), text=torch.randn(1, 5, 64), **extra)
    assert forward_flops(cfg, 4, 8, 12, 5).total == counter.get_total_flops()


def test_parameter_count_matches_model_and_presets():
    cfg = model_config("tiny")
    assert parameter_count(cfg) == sum(p.numel() for p in VideoDiT(cfg).parameters())
    assert (
        parameter_count(model_config("XL"))
        > parameter_count(model_config("L"))
        > parameter_count(model_config("B"))
    )


def test_bad_grid():
    with pytest.raises(ValueError, match="not divisible"):
        forward_flops(model_config("tiny"), 4, 9, 8, 3)
