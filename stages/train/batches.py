"""What the step loop does to a loader batch before the model sees it: the stage's training geometry
(`fit_batch`, and `check_shard_geometry` of a shard directory before the first step), super-resolution
pairs (`sr_pair`), the diffusion times, noise and text dropout of a batch (`draw_noise`), a guidance-
distilled student's guidance weights (`draw_guidance`), and its frozen text embeddings (`encode_frozen`).

Without data.reduce, training never guesses a geometry: shard samples must be data.frames × height ×
width (images 1 × height × width; with preprocess.resize=bucket, any of preprocess.buckets for height ×
width), and anything else stops the run, naming both geometries and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from configs import RunConfig
from configs.schema import DistillConfig
from models.diffusion import CosineSchedule, augment_condition, sample_augment_levels, student_times
from models.superres import degrade, reduce_video
from models.text import T5TextEncoder

if TYPE_CHECKING:  # the loader module loads webdataset: `import stages.train` stays without it
    from stages.shards.loader import Batch


def draw_noise(
    batch: Batch, gen: torch.Generator, dropout: float, distill: DistillConfig | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(times, noise, drop_text) for a batch: per item for videos, per frame for packed images; the
    times of a progressive-distillation round lie on its student's sampling grid."""
    x = batch.x  # (B, C, T, H, W)
    shape = (x.shape[0],) if batch.kind == "video" else (x.shape[0], x.shape[2])  # (B,) or (B, T)
    if distill is not None and distill.teacher:
        times = student_times(shape, distill.steps, gen)
    else:
        times = torch.rand(shape, generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    drop_text = torch.rand(shape, generator=gen) < dropout
    return times, noise, drop_text


def draw_guidance(batch: Batch, gen: torch.Generator, weights: list[float]) -> Tensor:
    """Guidance weights (B,) drawn uniformly from [w_min, w_max] for a guidance-distilled student."""
    low, high = weights
    return low + (high - low) * torch.rand(batch.x.shape[0], generator=gen)


def fit_batch(batch: Batch, cfg: RunConfig, gen: torch.Generator) -> Batch:
    """The batch at the stage's training geometry: reduced to data.frames × height × width when
    data.reduce is set (fps divided by the frame stride), else refused (ValueError) unless it already is
    at it; then randomly cropped per item to train.crop."""
    x, data_cfg, crop = batch.x, cfg.data, cfg.train.crop  # x: (B, C, T, H, W)
    changes: dict[str, Any] = {}
    if not data_cfg.reduce:
        if batch.kind == "images":  # packed along the frame axis: each frame is one 1 × H × W image
            _check_geometry((1, *x.shape[3:]), cfg, f"sample {batch.keys[0][0]} (an image)", 1)
        else:
            _check_geometry(tuple(x.shape[2:]), cfg, f"sample {batch.keys[0]} (a video clip)", None)
    else:
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


def check_shard_geometry(cfg: RunConfig) -> None:
    """Refuse, before the first step, shards whose preprocessing manifest (`manifest.json` of the
    data.shards directory, or of its parent when data.shards is the `shards/` folder) records sample
    shapes the run cannot train on without data.reduce. Shards without a manifest (URL lists, brace
    patterns) are checked batch by batch (`fit_batch`)."""
    if cfg.data.reduce:
        return
    manifest = _find_manifest(cfg.data.shards)
    if manifest is None:
        return
    try:
        shapes = json.loads(manifest.read_text(encoding="utf-8"))["shapes"]
        dims = [tuple(int(n) for n in key.split("x")) for key in shapes]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{manifest}: unreadable (expected the preprocessing manifest): {exc}") from None
    for shape in dims:
        if len(shape) != 3:
            raise ValueError(f"{manifest}: shape {'x'.join(map(str, shape))} is not TxHxW")
        frames = 1 if shape[0] == 1 else None  # a one-frame sample is an image
        _check_geometry(shape, cfg, f"a sample shape in {manifest}", frames)


def _find_manifest(shards: str) -> Path | None:
    folder = Path(shards)
    if (folder / "manifest.json").is_file():
        return folder / "manifest.json"
    if folder.name == "shards" and (folder.parent / "manifest.json").is_file():
        return folder.parent / "manifest.json"
    return None


def _check_geometry(shape: tuple[int, ...], cfg: RunConfig, what: str, frames: int | None) -> None:
    """ValueError unless a T × H × W `shape` is the run's training geometry: T = data.frames (or
    `frames`, for images) and H × W = data.height × width or, for bucketed preprocessing, a bucket."""
    d, p = cfg.data, cfg.preprocess
    sizes = {(d.height, d.width)}
    if p.resize == "bucket":
        sizes |= {(int(h), int(w)) for h, w in p.buckets}
    t, h, w = shape
    if t == (d.frames if frames is None else frames) and (h, w) in sizes:
        return
    buckets = " (or one of preprocess.buckets)" if p.resize == "bucket" else ""
    raise ValueError(
        f"data.shards: {what} is {t}×{h}×{w} (frames×height×width), but the run trains at "
        f"{d.frames}×{d.height}×{d.width} (data.frames×height×width{buckets}); set data.reduce=true to "
        "shrink them to the training geometry, or set data.frames/height/width to the shards' geometry"
    )


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
