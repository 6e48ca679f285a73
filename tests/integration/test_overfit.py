"""Learning check: a tiny model memorises one short clip, cutting the v-prediction loss at least 10×.

The loss is measured on a fixed set of (time, noise) draws before and after training, so the comparison
is not at the mercy of which noise levels a training batch happened to draw.
"""

from __future__ import annotations

import math

import pytest
import torch

from configs import model_config
from models.diffusion import CosineSchedule, training_loss
from models.dit import VideoDiT


def _moving_clip(frames: int = 4, size: int = 8) -> torch.Tensor:
    """(1, 3, T, H, W) in [-1, 1]: a bright disc moving across a colour gradient."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    clip = []
    for t in range(frames):
        cx = -0.5 + t / max(frames - 1, 1)
        disc = ((xs - cx) ** 2 + ys**2 < 0.15).float()
        clip.append(torch.stack([0.6 * xs + disc, 0.6 * ys - disc, disc - 0.5 * xs * ys]))
    return torch.stack(clip, dim=1)[None].clamp(-1, 1)


@pytest.mark.slow  # 300 optimizer steps
def test_tiny_model_overfits_one_clip():
    torch.manual_seed(0)
    model = VideoDiT(model_config("tiny", patch_size=[1, 1, 1], attention_backend="sdpa"))
    schedule = CosineSchedule()
    clip = _moving_clip()
    text = torch.randn(1, 4, 64)
    fps = torch.tensor([8.0])

    def loss_on(x0, t, noise):
        batch = x0.shape[0]
        return training_loss(
            model, x0, t, noise, schedule, text=text.expand(batch, -1, -1), fps=fps.expand(batch)
        ).mean()

    g = torch.Generator().manual_seed(1)
    eval_t = torch.linspace(0.02, 0.98, 32)
    eval_noise = torch.randn(32, *clip.shape[1:], generator=g)
    eval_x0 = clip.expand(32, -1, -1, -1, -1)
    with torch.no_grad():
        before = loss_on(eval_x0, eval_t, eval_noise).item()

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    steps, batch = 300, 8
    schedule_lr = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    for _ in range(steps):
        t = torch.rand(batch, generator=g)
        noise = torch.randn(batch, *clip.shape[1:], generator=g)
        loss = loss_on(clip.expand(batch, -1, -1, -1, -1), t, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule_lr.step()

    with torch.no_grad():
        after = loss_on(eval_x0, eval_t, eval_noise).item()
    assert math.isfinite(after)
    assert after * 10 <= before, f"v-loss fell only from {before:.4f} to {after:.4f}"
