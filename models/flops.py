"""Forward FLOPs of the video DiT, split by kind, for a model config and an input size.

A matrix product of (m × k) by (k × n) counts 2·m·k·n. Attention of N query tokens over L keys at width
D counts 4·N·L·D per layer (scores and weighted sum). Element-wise work (norms, softmax, activations)
is not counted, as is usual for MFU. Training costs about 3× the forward (forward + 2× backward).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from configs.schema import ModelConfig
from models.dit import VideoDiT
from models.layers import ScalarEmbedder


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per sample by kind."""

    linear: int
    spatial_attention: int
    temporal_attention: int
    cross_attention: int

    @property
    def attention(self) -> int:
        return self.spatial_attention + self.temporal_attention + self.cross_attention

    @property
    def total(self) -> int:
        return self.linear + self.attention

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def token_grid(cfg: ModelConfig, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The patch grid (T', H', W') of a (T, H, W) input; ValueError when the patch does not divide it."""
    sizes = (frames, height, width)
    if any(s % p for s, p in zip(sizes, cfg.patch_size)):
        raise ValueError(f"(T, H, W) = {sizes} is not divisible by the patch size {tuple(cfg.patch_size)}")
    return tuple(s // p for s, p in zip(sizes, cfg.patch_size))  # type: ignore[return-value]


def forward_flops(cfg: ModelConfig, frames: int, height: int, width: int, text_tokens: int) -> FlopCount:
    """Forward FLOPs of one sample of (frames, height, width) pixels with `text_tokens` text tokens."""
    tp, hp, wp = token_grid(cfg, frames, height, width)
    s = hp * wp
    n = tp * s
    d, dt, length = cfg.width, cfg.text_dim, text_tokens
    hidden = int(d * cfg.mlp_ratio)
    patch_in = math.prod(cfg.patch_size) * cfg.in_channels * (2 if cfg.kind != "base" else 1)
    patch_out = math.prod(cfg.patch_size) * cfg.in_channels
    temporal = cfg.temporal_layers and tp > 1

    def mm(rows: int, fan_in: int, fan_out: int) -> int:
        return 2 * rows * fan_in * fan_out

    embedders = 3 if cfg.kind != "base" else 2  # time, fps (+ augmentation level)
    freq = ScalarEmbedder(1, 1.0).freq_dim
    conditioning = embedders * (mm(1, freq, d) + mm(1, d, d)) + mm(1, dt, d)  # + pooled text
    text = mm(length, dt, d) + mm(length, d, d)
    per_block = (
        mm(n, d, 3 * d)
        + mm(n, d, d)  # spatial qkv, out
        + (mm(n, d, 3 * d) + mm(n, d, d) + mm(1, d, 2 * d) if temporal else 0)  # temporal (+ modulation)
        + mm(n, d, d)
        + mm(length, d, 2 * d)
        + mm(n, d, d)  # cross q, kv, out
        + mm(n, d, hidden)
        + mm(n, hidden, d)  # MLP
        + mm(1, d, 6 * d)  # adaLN modulation
    )
    linear = (
        conditioning
        + text
        + mm(n, patch_in, d)
        + cfg.depth * per_block
        + mm(1, d, 2 * d)
        + mm(n, d, patch_out)
    )
    return FlopCount(
        linear=linear,
        spatial_attention=cfg.depth * 4 * n * s * d,
        temporal_attention=cfg.depth * 4 * n * tp * d if temporal else 0,
        cross_attention=cfg.depth * 4 * n * length * d,
    )


def parameter_count(cfg: ModelConfig) -> int:
    """Trainable parameters of the model a config builds (on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = VideoDiT(cfg)
    return sum(p.numel() for p in model.parameters())
