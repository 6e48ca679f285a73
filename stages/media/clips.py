"""Clip geometry in time and space: resampling to a target fps, scene cuts, clip plans, resize/crop.

Pure numpy + PIL, no decoding: `stages/media/decode.py` feeds it timestamps and frames. Time is handled by
presentation timestamps (never by frame counts), so variable-frame-rate sources give evenly timed
clips; space is "resize to cover, then center crop", to a fixed size or to the nearest aspect bucket.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from configs.schema import RunConfig

THUMB_SIZE = 32
"""Side of the grey thumbnails the scene-cut detector compares."""

TIME_EPS = 1e-4
"""Seconds of slack when matching a target time to the frame on screen (float32 timestamps)."""

# ---------------------------------------------------------------------------------------------------
# Spec
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipSpec:
    """Everything decoding and clipping need, flattened from the run config (picklable, hashable)."""

    frames: int
    """Frames per clip T at the target fps."""
    fps: float
    """Target frame rate."""
    stride: int
    """Resampled frames between clip starts (0 = frames: back-to-back clips)."""
    max_clips: int
    """Cap on clips per video (0 = no cap)."""
    scene_cut_threshold: float
    """Mean absolute grey difference (0-255) between thumbnails that marks a cut (0 disables)."""
    resize: str
    """crop (fixed height × width) or bucket (nearest aspect-ratio bucket)."""
    height: int
    """Target height for resize=crop."""
    width: int
    """Target width for resize=crop."""
    buckets: tuple[tuple[int, int], ...] = ()
    """(H, W) buckets for resize=bucket."""
    min_source_side: int = 1
    """Inputs whose shorter side is below this fail as too small."""
    decoder: str = "auto"
    """auto (decord, PyAV fallback), decord or pyav."""
    frame_multiple: int = 1
    """Clip lengths are multiples of this (the temporal patch size pt)."""
    threads: int = 1
    """Decoder threads (does not change the frames)."""

    @property
    def step(self) -> int:
        """Effective stride: `stride`, or `frames` when stride is 0."""
        return self.stride if self.stride > 0 else self.frames

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ClipSpec:
        """Flatten `cfg.data`, `cfg.preprocess` and `cfg.model.patch_size` into a spec."""
        p = cfg.preprocess
        return cls(
            frames=int(cfg.data.frames),
            fps=float(cfg.data.fps),
            stride=int(p.stride),
            max_clips=int(p.max_clips_per_video),
            scene_cut_threshold=float(p.scene_cut_threshold),
            resize=str(p.resize),
            height=int(cfg.data.height),
            width=int(cfg.data.width),
            buckets=tuple((int(b[0]), int(b[1])) for b in p.buckets),
            min_source_side=int(p.min_source_side),
            decoder=str(p.decoder),
            frame_multiple=int(cfg.model.patch_size[0]),
            threads=max(1, int(p.decode_threads)),
        )


# ---------------------------------------------------------------------------------------------------
# Time: resampling by timestamps
# ---------------------------------------------------------------------------------------------------


def resample_indices(
    timestamps: np.ndarray, fps: float, start: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pick the source frame on screen at each target time start, start + 1/fps, ... up to the end.

    `timestamps` are the presentation times (seconds, ascending, VFR allowed) of every source frame.
    The last frame lasts the median frame interval (1/fps for a single frame). Returns the source
    index (int64) and the target time (float64) of every output frame; a source frame may repeat
    (upsampling) or be skipped (downsampling).
    """
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    ts = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    if ts.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    t0 = float(ts[0]) if start is None else float(start)
    last_duration = float(np.median(np.diff(ts))) if ts.size > 1 else 1.0 / fps
    end = float(ts[-1]) + max(last_duration, 0.0)
    span = (end - t0) * fps
    n = math.floor(span - 1e-6) + 1 if span > 0 else 0
    times = t0 + np.arange(n, dtype=np.float64) / fps
    indices = np.searchsorted(ts, times + TIME_EPS, side="right") - 1
    return np.clip(indices, 0, ts.size - 1).astype(np.int64), times


# ---------------------------------------------------------------------------------------------------
# Scene cuts
# ---------------------------------------------------------------------------------------------------


def _area_weights(n: int, out: int) -> np.ndarray:
    """(out, n) matrix averaging n samples into `out` equal cells by overlap (box/area resampling)."""
    edges = np.arange(out + 1) * (n / out)
    lo = np.maximum(edges[:-1, None], np.arange(n)[None, :])
    hi = np.minimum(edges[1:, None], np.arange(1, n + 1)[None, :])
    return (np.clip(hi - lo, 0, None) / (n / out)).astype(np.float32)


LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
"""ITU-R 601 luma weights (as PIL's "L" conversion)."""


def grey_thumbnails(frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, 32, 32) float32 grey in 0-255, by area averaging (cheap, noise-robust)."""
    _, h, w, _ = frames.shape
    grey = frames.astype(np.float32) @ LUMA
    return _area_weights(h, THUMB_SIZE) @ grey @ _area_weights(w, THUMB_SIZE).T


def scene_cuts(thumbs: np.ndarray, threshold: float) -> list[int]:
    """Positions i with mean |thumb[i] − thumb[i−1]| > threshold: a cut just before frame i."""
    thumbs = np.asarray(thumbs, dtype=np.float32)
    if threshold <= 0 or len(thumbs) < 2:
        return []
    diffs = np.abs(thumbs[1:] - thumbs[:-1]).reshape(len(thumbs) - 1, -1).mean(axis=1)
    return [int(i) + 1 for i in np.flatnonzero(diffs > threshold)]


# ---------------------------------------------------------------------------------------------------
# Clip plans
# ---------------------------------------------------------------------------------------------------


def plan_clips(n: int, cuts: list[int], spec: ClipSpec) -> list[tuple[int, int]]:
    """(start, end) ranges over n resampled frames: spec.frames long, every stride, never across a cut.

    Clips restart at the first frame after each cut. A video with fewer than spec.frames resampled
    frames gives one shorter clip (its first segment, trimmed to a multiple of frame_multiple), or
    nothing when not even frame_multiple frames exist: frames are never padded.
    """
    multiple = max(1, spec.frame_multiple)
    bounds = [0, *sorted({c for c in cuts if 0 < c < n}), n]
    segments = list(itertools.pairwise(bounds))
    if n <= 0:
        return []
    if n < spec.frames:
        first = segments[0][1] - segments[0][0]
        length = first // multiple * multiple
        return [(0, length)] if length >= multiple else []
    length = spec.frames // multiple * multiple or spec.frames
    plan: list[tuple[int, int]] = []
    for a, b in segments:
        for s in range(a, b - length + 1, spec.step):
            if spec.max_clips > 0 and len(plan) >= spec.max_clips:
                return plan
            plan.append((s, s + length))
    return plan


def frames_to_decode(n: int, spec: ClipSpec) -> int:
    """How many leading resampled frames a video needs at most: max_clips·stride + frames, or all."""
    if spec.max_clips <= 0:
        return n
    return min(n, spec.max_clips * spec.step + spec.frames)


# ---------------------------------------------------------------------------------------------------
# Space: target size, resize + center crop
# ---------------------------------------------------------------------------------------------------


def target_size(h: int, w: int, spec: ClipSpec) -> tuple[int, int]:
    """(H, W) for an upright h × w source: the fixed crop size, or the bucket of nearest log aspect."""
    if spec.resize == "crop":
        return (spec.height, spec.width)
    if not spec.buckets:
        raise ValueError("resize=bucket needs at least one (H, W) bucket")
    ratio = math.log(h / w)
    gaps = [abs(math.log(bh / bw) - ratio) for bh, bw in spec.buckets]
    best = gaps.index(min(gaps))  # first bucket wins ties
    bh, bw = spec.buckets[best]
    return (int(bh), int(bw))


def resize_crop(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (antialiased bilinear) so the frame covers size = (H, W), keeping the center.

    Implemented as one PIL resize of the centred source box that maps onto the target, which is the
    same as "scale by max(H/h, W/w) then center crop" but never materialises a huge intermediate
    (a 10000×16 strip) and keeps sub-pixel centring.
    """
    th, tw = int(size[0]), int(size[1])
    h, w = frame.shape[:2]
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected an (h, w, 3) uint8 frame, got {frame.shape} {frame.dtype}")
    if (h, w) == (th, tw):
        return np.ascontiguousarray(frame)
    scale = max(th / h, tw / w)
    bw, bh = tw / scale, th / scale
    x0, y0 = (w - bw) / 2.0, (h - bh) / 2.0
    img = Image.fromarray(np.ascontiguousarray(frame))
    out = img.resize((tw, th), Image.Resampling.BILINEAR, box=(x0, y0, x0 + bw, y0 + bh), reducing_gap=3.0)
    return np.asarray(out, dtype=np.uint8)


def cover_size(h: int, w: int, size: tuple[int, int]) -> tuple[int, int] | None:
    """(sh, sw) an upright h × w source shrinks to (aspect kept to within a pixel) so it just covers
    size = (H, W), for decoders that scale while converting to RGB; None when covering needs no
    shrinking (then the full frame goes through `resize_crop`). Each side keeps the parity of the
    target's, so the center crop is exactly centred (no half-pixel shift against `resize_crop`)."""
    th, tw = int(size[0]), int(size[1])
    scale = max(th / h, tw / w)
    if scale >= 1.0:
        return None

    def side(exact: float, target: int) -> int:
        if exact <= target + 1:
            return target
        low = target + 2 * int((exact - target) // 2)  # same parity as target, ≤ exact
        return low if exact - low <= low + 2 - exact else low + 2

    return (side(h * scale, th), side(w * scale, tw))


def center_crop(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The centred (H, W) window of a frame at least that large."""
    th, tw = int(size[0]), int(size[1])
    h, w = frame.shape[:2]
    if h < th or w < tw:
        raise ValueError(f"cannot crop {h}x{w} to {th}x{tw}")
    y0, x0 = (h - th) // 2, (w - tw) // 2
    return np.ascontiguousarray(frame[y0 : y0 + th, x0 : x0 + tw])
