"""Read a synthetic-vocabulary video back: which colour, which shape, moving which way.

The inverse of `stages.synth` for judging generated videos: `describe` finds the pixels that differ
from the background and keeps, per frame, their largest connected blob; if that blob is not most of
the foreground in most frames, the clip shows scattered pieces rather than one object, and its shape
and motion cannot be told. Otherwise it names the colour (nearest palette entry), the shape (a
triangle, apex up, is much narrower in the top third of its bounding box than in the bottom third; of
the symmetric shapes a square fills its box, a circle π/4 of it) and the motion (the centroid's
displacement between the first and last quarter of the clip). `judge` compares that with a caption
`a {color} {shape}[ moving {direction}]`. The run report uses it; it knows nothing of models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from stages.synth.make import BACKGROUND, COLORS, DIRECTIONS, SHAPES

FOREGROUND_DISTANCE = 60.0
"""RGB distance from the background above which a pixel counts as part of the shape."""

MIN_FOREGROUND = 0.01
"""Frames whose foreground covers less than this share of the frame are ignored."""

MIN_OBJECT_SHARE = 0.75
"""Share of a frame's foreground its largest connected blob must hold for the frame to show one object."""

MIN_MOTION = 0.1
"""Centroid travel, as a share of the frame side, below which a clip counts as still."""

SQUARE_FILL = 0.89
"""Bounding-box fill above which a symmetric shape is a square (circle π/4 ≈ 0.79, square 1)."""

TRIANGLE_TAPER = 0.7
"""Width of the box's top third over its bottom third below which a shape is a triangle (circle 1)."""

_CAPTION = re.compile(r"^a (\w+) (\w+)(?: moving (\w+))?$")


@dataclass(frozen=True)
class Description:
    """What a clip shows; None where it cannot be told (no foreground, or no clear motion)."""

    color: str | None
    shape: str | None
    direction: str | None

    def caption(self) -> str:
        """In the dataset's caption form, with `?` for what could not be told."""
        text = f"a {self.color or '?'} {self.shape or '?'}"
        return text + (f" moving {self.direction}" if self.direction else "")


def parse_caption(caption: str) -> Description:
    """`a {color} {shape}[ moving {direction}]` → Description; ValueError for other text."""
    match = _CAPTION.match(caption.strip().lower())
    if not match or match[1] not in COLORS or match[2] not in SHAPES:
        raise ValueError(f"not a synthetic-dataset caption: {caption!r}")
    if match[3] is not None and match[3] not in DIRECTIONS:
        raise ValueError(
            f"unknown direction {match[3]!r} in caption {caption!r}; expected one of {DIRECTIONS}"
        )
    return Description(match[1], match[2], match[3])


def _foreground(video: np.ndarray) -> np.ndarray:
    """(T, H, W) bool: pixels far from the background colour."""
    distance = np.linalg.norm(video.astype(np.float32) - np.array(BACKGROUND, np.float32), axis=-1)
    return distance > FOREGROUND_DISTANCE


def _color(video: np.ndarray, mask: np.ndarray) -> str:
    median = np.median(video[mask].astype(np.float32), axis=0)
    names = list(COLORS)
    palette = np.array([COLORS[name] for name in names], np.float32)
    return names[int(np.argmin(np.linalg.norm(palette - median, axis=1)))]


def _fill_and_taper(mask: np.ndarray) -> tuple[float, float]:
    """In one frame: the share of the foreground's bounding box it covers, and its top/bottom taper."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    third = max(1, len(box) // 3)
    top, bottom = box[:third].sum(axis=1).mean(), box[-third:].sum(axis=1).mean()
    return float(box.mean()), float(top / max(bottom, 1.0))


def _shape(masks: np.ndarray) -> str:
    fill, taper = np.median([_fill_and_taper(m) for m in masks], axis=0)
    if taper < TRIANGLE_TAPER:
        return "triangle"
    return "square" if fill >= SQUARE_FILL else "circle"


def _direction(masks: np.ndarray, side: int) -> str | None:
    if len(masks) < 2:
        return None
    centroids = np.array([[xs.mean(), ys.mean()] for ys, xs in (np.nonzero(m) for m in masks)])
    quarter = max(1, len(masks) // 4)
    dx, dy = centroids[-quarter:].mean(axis=0) - centroids[:quarter].mean(axis=0)
    if max(abs(dx), abs(dy)) < MIN_MOTION * side:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a (H, W) bool mask (all False for an empty mask)."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        stack, blob = [start], []
        while stack:
            y, x = stack.pop()
            blob.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(blob) > len(best):
            best = blob
    out = np.zeros_like(mask)
    if best:
        out[tuple(np.array(best).T)] = True
    return out


def describe(video: np.ndarray) -> Description:
    """Colour, shape and motion of a uint8 RGB clip (T, H, W, 3) in the synthetic dataset's vocabulary."""
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a (T, H, W, 3) RGB clip, got shape {tuple(video.shape)}")
    mask = _foreground(video)
    height, width = video.shape[1:3]
    kept = mask.reshape(len(mask), -1).mean(axis=1) >= MIN_FOREGROUND
    if not kept.any():
        return Description(None, None, None)
    masks = mask[kept]
    blobs = np.stack([largest_blob(m) for m in masks])
    color = _color(video, mask)
    one_object = blobs.sum(axis=(1, 2)) >= MIN_OBJECT_SHARE * masks.sum(axis=(1, 2))
    if one_object.mean() < 0.5:
        return Description(color, None, None)  # scattered pieces: no shape, no motion to read
    return Description(color, _shape(blobs), _direction(blobs, min(height, width)))


def judge(video: np.ndarray, caption: str) -> dict[str, bool]:
    """Per attribute of the caption (color, shape and, if it moves, direction): does the clip match it?"""
    return compare(describe(video), parse_caption(caption))


def compare(seen: Description, want: Description) -> dict[str, bool]:
    """`judge` for a clip already described and a caption already parsed."""
    verdict = {"color": seen.color == want.color, "shape": seen.shape == want.shape}
    if want.direction is not None:
        verdict["direction"] = seen.direction == want.direction
    return verdict
