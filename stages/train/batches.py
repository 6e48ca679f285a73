"""What the step loop does to a loader batch before the model sees it: the stage's training geometry
(`fit_batch`), super-resolution pairs (`sr_pair`), the diffusion times, noise and text dropout of a
batch (`draw_noise`), and its captions or frozen text embeddings."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from configs import RunConfig
from models.diffusion import CosineSchedule, augment_condition, sample_augment_levels
from models.superres import degrade, reduce_video
from models.text import T5TextEncoder


def draw_noise(batch: dict[str, Any], gen: torch.Generator, dropout: float) -> tuple[Tensor, Tensor, Tensor]:
    """(t, noise, drop_text) for a batch: per item for videos, per frame for packed images."""
    x = batch["x"]
    b, _, f = x.shape[:3]
    shape = (b,) if batch["kind"] == "video" else (b, f)
    t = torch.rand(shape, generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    drop = torch.rand(shape, generator=gen) < dropout
    return t, noise, drop


def fit_batch(batch: dict[str, Any], cfg: RunConfig, gen: torch.Generator) -> dict[str, Any]:
    """The batch at the stage's training geometry: reduced to data.frames × height × width when
    data.reduce is set (fps divided by the frame stride), then randomly cropped per item to train.crop."""
    x, d, crop = batch["x"], cfg.data, cfg.train.crop
    if d.reduce:
        frames = d.frames if batch["kind"] == "video" else x.shape[2]  # packed images keep every image
        if tuple(x.shape[2:]) != (frames, d.height, d.width):
            stride = x.shape[2] // frames
            x = reduce_video(x, frames, d.height, d.width)
            if batch["kind"] == "video":
                batch = {**batch, "fps": batch["fps"] / stride}
    if crop:
        height, width = x.shape[-2:]
        if height < crop[0] or width < crop[1]:
            raise ValueError(f"train.crop {crop} is larger than the batch's {height}×{width} frames")
        ys = torch.randint(0, height - crop[0] + 1, (x.shape[0],), generator=gen).tolist()
        xs = torch.randint(0, width - crop[1] + 1, (x.shape[0],), generator=gen).tolist()
        x = torch.stack([v[..., y : y + crop[0], c : c + crop[1]] for v, y, c in zip(x, ys, xs)])
    return {**batch, "x": x}


def sr_pair(
    x: Tensor, cfg: RunConfig, schedule: CosineSchedule, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """(residual, cond, level) of a super-resolution batch of target clips `x`.

    The upsampled input `up = degrade(x)` (models.superres) is what the stage will receive at render time;
    the model denoises the residual `x - up` and sees `up` noised to a level drawn uniformly from
    [0, diffusion.cond_aug_max] per item, which it is also given.
    """
    levels = sample_augment_levels(x.shape[0], cfg.diffusion.cond_aug_max, gen)
    up = degrade(x, cfg.model.kind, cfg.model.sr_factor)
    return x - up, augment_condition(up, levels, schedule, gen), levels


def flat_captions(batch: dict[str, Any]) -> list[str]:
    caps = batch["captions"]
    return [c for item in caps for c in item] if batch["kind"] != "video" else list(caps)


@torch.no_grad()
def encode_frozen(encoder: T5TextEncoder, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    emb = encoder(flat_captions(batch))
    if batch["kind"] == "video":
        return emb.tokens, emb.mask
    b, f = batch["x"].shape[0], batch["x"].shape[2]
    return emb.tokens.view(b, f, *emb.tokens.shape[1:]), emb.mask.view(b, f, -1)
