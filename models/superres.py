"""Super-resolution conditioning: the degradation that makes training pairs and the upsampling that
brings a low-resolution video to the output size.

One definition serves training and rendering alike, so a stage sees at sampling time exactly the kind
of input it was trained on:

- TSR by k: keep every k-th frame (`downsample_video`), then repeat each frame k times (`upsample_video`);
- SSR by s: antialiased bicubic downsampling of each frame by s, then bicubic upsampling back.

The upsampled video is concatenated to the noisy input by the model (`VideoDiT` with kind tsr/ssr).
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def _check_video(x: Tensor, name: str) -> None:
    if x.dim() != 5:
        raise ValueError(f"{name}: expected a (B, C, T, H, W) video, got shape {tuple(x.shape)}")


def _resize_frames(x: Tensor, height: int, width: int, antialias: bool) -> Tensor:
    b = x.shape[0]
    frames = rearrange(x, "B C T H W -> (B T) C H W")
    frames = F.interpolate(
        frames, size=(height, width), mode="bicubic", align_corners=False, antialias=antialias
    )
    return rearrange(frames, "(B T) C H W -> B C T H W", B=b)


def downsample_video(x: Tensor, kind: str, factor: int) -> Tensor:
    """The low-resolution input a `kind` stage with `factor` upsamples from: (B, C, T, H, W) →
    (B, C, T/k, H, W) for tsr, (B, C, T, H/s, W/s) for ssr (antialiased bicubic)."""
    _check_video(x, "video")
    t, h, w = x.shape[2:]
    if factor < 1:
        raise ValueError(f"super-resolution factor must be >= 1, got {factor}")
    if kind == "tsr":
        if t % factor:
            raise ValueError(f"tsr ×{factor}: {t} frames are not a whole multiple of {factor}")
        return x[:, :, ::factor]
    if kind == "ssr":
        if h % factor or w % factor:
            raise ValueError(f"ssr ×{factor}: frame size {h}×{w} is not divisible by {factor}")
        return _resize_frames(x, h // factor, w // factor, antialias=True)
    raise ValueError(f"super-resolution kind '{kind}' unknown; expected tsr or ssr")


def upsample_video(low: Tensor, frames: int, height: int, width: int) -> Tensor:
    """(B, C, t, h, w) → (B, C, frames, height, width): each frame repeated frames/t times, then bicubic
    resizing of each frame, clamped to [-1, 1]; frames must be a whole multiple of t."""
    _check_video(low, "low-resolution video")
    t_low = low.shape[2]
    if frames % t_low:
        raise ValueError(f"cannot upsample {t_low} frames to {frames}: not a whole multiple")
    out = low.repeat_interleave(frames // t_low, dim=2) if frames != t_low else low
    if out.shape[-2:] != (height, width):
        out = _resize_frames(out, height, width, antialias=False).clamp(-1.0, 1.0)
    return out


def degrade(x: Tensor, kind: str, factor: int) -> Tensor:
    """The conditioning of a training pair: `x` downsampled by the stage's factor and upsampled back to
    its own shape (B, C, T, H, W)."""
    return upsample_video(downsample_video(x, kind, factor), *x.shape[2:])


def reduce_video(x: Tensor, frames: int, height: int, width: int) -> Tensor:
    """Bring a (B, C, T, H, W) clip down to (frames, height, width): every (T/frames)-th frame, then an
    antialiased bicubic resize; T must be a whole multiple of `frames` and the frames no smaller."""
    _check_video(x, "video")
    t, h, w = x.shape[2:]
    if t % frames or h < height or w < width:
        raise ValueError(
            f"cannot reduce {t}×{h}×{w} clips to {frames}×{height}×{width} (T×H×W): clips can only be "
            "shortened by a whole factor and shrunk"
        )
    x = x[:, :, :: t // frames]
    return _resize_frames(x, height, width, antialias=True) if (h, w) != (height, width) else x
