"""Factorized positions computed for any patch grid (T', H', W'), so one model runs at other resolutions,
aspect ratios and frame counts than it was trained on.

- rope: rotary embeddings applied to queries and keys; spatial attention rotates half of each head by
  the row index and half by the column index (2-D), temporal attention rotates by the frame index (1-D).
- sincos: absolute embeddings added to the tokens, frame, row and column tables in separate channels.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

ROPE_THETA = 10000.0


def _angles(positions: Tensor, pairs: int) -> Tensor:
    """(L, pairs) rotation angles: position × geometric frequencies."""
    freqs = ROPE_THETA ** (-torch.arange(pairs, dtype=torch.float32, device=positions.device) / pairs)
    return positions.float()[:, None] * freqs[None, :]


def temporal_rope(frames: int, head_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin tables (T', Dh/2) rotating each head by the frame index."""
    angles = _angles(torch.arange(frames, device=device), head_dim // 2)
    return angles.cos(), angles.sin()


def spatial_rope(height: int, width: int, head_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin tables (S, Dh/2), S = H'·W': half the pairs follow the row, half the column."""
    rows = torch.arange(height, device=device).repeat_interleave(width)  # (S,)
    cols = torch.arange(width, device=device).repeat(height)  # (S,)
    pairs = head_dim // 4
    angles = torch.cat([_angles(rows, pairs), _angles(cols, pairs)], dim=-1)  # (S, Dh/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of x (N, L, H, Dh) by the (L, Dh/2) angles."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, L, 1, Dh/2)
    pairs = rearrange(x.float(), "N L H (P two) -> N L H P two", two=2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rearrange(rotated, "N L H P two -> N L H (P two)").to(x.dtype)


def _sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """(L, dim) table: sin of the angles in the first half, cos in the second."""
    angles = _angles(positions, dim // 2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def frame_positions(segments: Tensor) -> Tensor:
    """(B, T') index of each frame within its segment (a contiguous run of equal ids), starting at 0."""
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def sincos_split(dim: int) -> tuple[int, int, int]:
    """Channels of a sincos table given to (frames, rows, columns): a quarter to time, the rest to space.

    Every part is even (sin and cos halves) when `dim` is a multiple of 8, which config validation asks.
    """
    frames = 2 * (dim // 8)
    rows = 2 * (3 * dim // 16)
    return frames, rows, dim - frames - rows


def sincos_table(frame_pos: Tensor, height: int, width: int, dim: int) -> Tensor:
    """(B, T'·H'·W', D) absolute positions in (T S) order: frame, row and column tables side by side.

    `frame_pos` (B, T') gives each frame's temporal position (restarting in every packed segment). Each
    axis owns its own channels (`sincos_split`), so a token's frame and row are never summed together.
    """
    device = frame_pos.device
    d_frames, d_rows, d_cols = sincos_split(dim)
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    spatial = torch.cat([_sincos_1d(rows, d_rows), _sincos_1d(cols, d_cols)], dim=-1)  # (S, D - d_frames)
    temporal = _sincos_1d(frame_pos.flatten(), d_frames).unflatten(0, frame_pos.shape)  # (B, T', d_frames)
    b, tp = frame_pos.shape
    table = torch.cat(
        [temporal[:, :, None, :].expand(b, tp, height * width, d_frames), spatial.expand(b, tp, -1, -1)],
        dim=-1,
    )  # (B, T', S, D)
    return rearrange(table, "B T S D -> B (T S) D")
