"""What the step loop does to a loader batch before the model sees it: the stage's training geometry
(`fit_batch`), super-resolution pairs (`sr_pair`), the diffusion times, noise and text dropout of a
batch (`draw_noise`), and its frozen text embeddings (`encode_frozen`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from configs import RunConfig
from models.diffusion import CosineSchedule, augment_condition, sample_augment_levels
from models.superres import degrade, reduce_video
from models.text import T5TextEncoder

if TYPE_CHECKING:  # the loader module loads webdataset: `import stages.train` stays without it
    from stages.shards.loader import Batch


def draw_noise(batch: Batch, gen: torch.Generator, dropout: float) -> tuple[Tensor, Tensor, Tensor]:
    """(times, noise, drop_text) for a batch: per item for videos, per frame for packed images."""
    x = batch.x  # (B, C, T, H, W)
    shape = (x.shape[0],) if batch.kind == "video" else (x.shape[0], x.shape[2])  # (B,) or (B, T)
    times = torch.rand(shape, generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    drop_text = torch.rand(shape, generator=gen) < dropout
    return times, noise, drop_text


def fit_batch(batch: Batch, cfg: RunConfig, gen: torch.Generator) -> Batch:
    """The batch at the stage's training geometry: reduced to data.frames × height × width when
    data.reduce is set (fps divided by the frame stride), then randomly cropped per item to train.crop."""
    x, data_cfg, crop = batch.x, cfg.data, cfg.train.crop  # x: (B, C, T, H, W)
    changes: dict[str, Any] = {}
    if data_cfg.reduce:
        frames = data_cfg.frames if batch.kind == "video" else x.shape[2]  # packed images keep every image
        if tuple(x.shape[2:]) != (frames, data_cfg.height, data_cfg.width):
            stride = x.shape[2] // frames
            x = reduce_video(x, frames, data_cfg.height, data_cfg.width)
            if batch.kind == "video":
                changes["fps"] = batch.fps / stride
    if crop:
        height, width = x.shape[-2:]
        if height < crop[0] or width < crop[1]:
            raise ValueError(f"train.crop {crop} is larger than the batch's {height}×{width} frames")
        ys = torch.randint(0, height - crop[0] + 1, (x.shape[0],), generator=gen).tolist()
        xs = torch.randint(0, width - crop[1] + 1, (x.shape[0],), generator=gen).tolist()
        x = torch.stack([v[..., y : y + crop[0], c : c + crop[1]] for v, y, c in zip(x, ys, xs)])
    return batch.replace(x=x, **changes)


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


@torch.no_grad()
def encode_frozen(encoder: T5TextEncoder, batch: Batch) -> tuple[Tensor, Tensor]:
    """(text, text_mask) of the batch's captions from a frozen encoder, laid out as the loader lays out
    stored embeddings: (B, L, D) + (B, L) for videos, (B, T, L, D) + (B, T, L) for packed images."""
    emb = encoder(batch.flat_captions())  # (B or B·T, L, D)
    if batch.kind == "video":
        return emb.tokens, emb.mask
    items, frames = batch.x.shape[0], batch.x.shape[2]
    return emb.tokens.view(items, frames, *emb.tokens.shape[1:]), emb.mask.view(items, frames, -1)
