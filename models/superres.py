"""Conditioning input of super-resolution models: the low-resolution video brought to the output size.

Temporal super-resolution repeats frames (TSR by k: each frame k times); spatial super-resolution
interpolates each frame (bilinear or bicubic). The result is concatenated to the noisy input by the
model (`VideoDiT` with kind tsr/ssr).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def upsample_video(
    low: Tensor, frames: int, height: int, width: int, mode: Literal["bilinear", "bicubic"] = "bilinear"
) -> Tensor:
    """(B, C, T, h, w) → (B, C, frames, height, width); frames must be a whole multiple of T."""
    if low.dim() != 5:
        raise ValueError(f"low-resolution video: expected (B, C, T, H, W), got shape {tuple(low.shape)}")
    t_low = low.shape[2]
    if frames % t_low:
        raise ValueError(f"cannot upsample {t_low} frames to {frames}: not a whole multiple")
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"spatial upsampling mode '{mode}' unknown; expected bilinear or bicubic")
    out = low.repeat_interleave(frames // t_low, dim=2) if frames != t_low else low
    if out.shape[-2:] != (height, width):
        b = out.shape[0]
        out = rearrange(out, "B C T H W -> (B T) C H W")
        out = F.interpolate(out, size=(height, width), mode=mode, align_corners=False)
        out = rearrange(out, "(B T) C H W -> B C T H W", B=b)
    return out
