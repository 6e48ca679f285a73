"""Synthetic captioned dataset for the demo and tests: coloured shapes moving across a plain background.

Every video shows one shape (circle, square, triangle) in one colour (red, green, blue, yellow) travelling
left, right, up or down, captioned `a {color} {shape} moving {direction}`; every still image shows one
shape at a random position, captioned `a {color} {shape}`. The shape's box is `shape_size` of the frame's
side and crosses most of the frame over the clip, so colour, shape and motion stay learnable at 32×32;
`position_jitter` < 1 keeps the other coordinate (and a still's position) near the frame's centre (the
settings and their defaults: `configs.schema.SynthConfig`). Shapes are exact numpy pixel masks (no
anti-aliasing) so tests can check colours, and the whole dataset, bytes included, is a function of the
seed: attributes come from one `numpy.random.default_rng(seed)` and the H.264 encoder
(`stages.media.write_mp4`) runs single-threaded with a fixed preset, without macroblock-tree rate
control and with no timestamps or version strings in the container.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from configs import SynthConfig
from configs.validate import validate_synth
from stages.atomic import remove_leftovers, write_text
from stages.folder_lock import folder_lock
from stages.media import CRF, PRESET, X264_PARAMS, write_mp4, write_png

# ---------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
}
"""Shape colours (RGB), saturated but inside the limited-range YUV gamut so H.264 keeps them clean."""

BACKGROUND: tuple[int, int, int] = (64, 64, 64)
"""Plain dark-grey background, far from every shape colour."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")

VIDEO_COMBOS: tuple[tuple[str, str, str], ...] = tuple(itertools.product(COLORS, SHAPES, DIRECTIONS))
"""All 48 (color, shape, direction) triples; videos cycle through shuffled copies of this list."""

IMAGE_COMBOS: tuple[tuple[str, str], ...] = tuple(itertools.product(COLORS, SHAPES))
"""All 12 (color, shape) pairs; images cycle through shuffled copies of this list."""

MANIFEST = "synth.json"


# ---------------------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SynthSummary:
    """What `run_synth` wrote: counts and the media files (each has a sidecar `.txt` caption)."""

    out: Path
    videos: int
    images: int
    files: list[Path] = field(default_factory=list)

    def table(self) -> str:
        """A short summary table for the end of the job."""
        rows = [("videos (.mp4)", self.videos), ("images (.png)", self.images), ("total", len(self.files))]
        width = max(len(name) for name, _ in rows)
        lines = [f"synthetic dataset in {self.out}"]
        lines += [f"  {name:<{width}}  {n:>6}" for name, n in rows]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Geometry: exact pixel masks
# ---------------------------------------------------------------------------------------------------------


def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of `shape` filling its box, decided per pixel centre (no anti-aliasing).

    The triangle is isosceles with its apex at the top centre and its base on the bottom row.
    """
    c = np.arange(side) + 0.5  # pixel centres
    y, x = np.meshgrid(c, c, indexing="ij")
    half = side / 2
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        return (x - half) ** 2 + (y - half) ** 2 <= half**2
    if shape == "triangle":
        return np.abs(x - half) <= y / 2  # half-width grows from 0 at the apex to side/2 at the base
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def render_frame(size: int, color: str, mask: np.ndarray, x: int, y: int) -> np.ndarray:
    """An RGB uint8 (size, size, 3) frame: background with `mask` painted in `color`, top-left at (x, y)."""
    frame = np.empty((size, size, 3), dtype=np.uint8)
    frame[:] = BACKGROUND
    side = mask.shape[0]
    region = frame[y : y + side, x : x + side]  # (side, side, 3) view
    region[mask] = COLORS[color]
    return frame


def shape_side(size: int, shape_size: float = SynthConfig.shape_size) -> int:
    """Side of the shape's box in pixels: `shape_size` of the frame's side, at least 4."""
    return max(4, round(size * shape_size))


def _inside(size: int, side: int) -> tuple[int, int]:
    """Inclusive range of a top-left coordinate that keeps a `side` box inside the frame, minus a margin."""
    margin = max(1, size // 32)
    return margin, size - side - margin


def _track(size: int, side: int, direction: str, cross: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Top-left (x, y) at the first and last frame: the moving axis spans the frame minus a margin."""
    lo, hi = _inside(size, side)
    a, b = {"right": (lo, hi), "down": (lo, hi), "left": (hi, lo), "up": (hi, lo)}[direction]
    if direction in ("left", "right"):
        return (a, cross), (b, cross)
    return (cross, a), (cross, b)


# ---------------------------------------------------------------------------------------------------------
# Plan: every random draw happens here, before any file is written
# ---------------------------------------------------------------------------------------------------------


def _cycled(rng: np.random.Generator, n: int, pool: int) -> list[int]:
    """`n` indices into a pool, taken from consecutive shuffled copies so every entry appears by n ≥ pool."""
    out: list[int] = []
    while len(out) < n:
        out.extend(int(i) for i in rng.permutation(pool))
    return out[:n]


def position_range(size: int, side: int, jitter: float) -> tuple[int, int]:
    """Inclusive range of a shape's free top-left coordinate: the central `jitter` share of the frame's.

    jitter 1 lets the shape sit anywhere fully inside the frame; 0 pins it to the centre line.
    """
    lo, hi = _inside(size, side)
    centre, half = (lo + hi) / 2, jitter * (hi - lo) / 2
    first = math.floor(centre - half + 0.5)
    return first, max(first, math.floor(centre + half))


def plan_items(
    count: int,
    size: int,
    seed: int,
    image_fraction: float = SynthConfig.image_fraction,
    position_jitter: float = SynthConfig.position_jitter,
    shape_size: float = SynthConfig.shape_size,
) -> list[dict[str, object]]:
    """The dataset's items (videos then images) as manifest entries; deterministic per seed."""
    rng = np.random.default_rng(seed)
    n_images = round(count * image_fraction)
    n_videos = count - n_images
    side = shape_side(size, shape_size)
    lo, hi = position_range(size, side, position_jitter)

    items: list[dict[str, object]] = []
    for i, k in enumerate(_cycled(rng, n_videos, len(VIDEO_COMBOS))):
        color, shape, direction = VIDEO_COMBOS[k]
        start, end = _track(size, side, direction, int(rng.integers(lo, hi + 1)))
        items.append(
            {
                "file": f"video_{i:05d}.mp4",
                "caption": f"a {color} {shape} moving {direction}",
                "color": color,
                "shape": shape,
                "direction": direction,
                "side": side,
                "start": list(start),
                "end": list(end),
            }
        )
    for i, k in enumerate(_cycled(rng, n_images, len(IMAGE_COMBOS))):
        color, shape = IMAGE_COMBOS[k]
        x, y = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        items.append(
            {
                "file": f"image_{i:05d}.png",
                "caption": f"a {color} {shape}",
                "color": color,
                "shape": shape,
                "direction": None,
                "side": side,
                "start": [x, y],
                "end": [x, y],
            }
        )
    return items


# ---------------------------------------------------------------------------------------------------------
# Writers (each writes to a temporary name and renames, so an interrupted run leaves no half file)
# ---------------------------------------------------------------------------------------------------------


def render_video(item: dict[str, object], frames: int, size: int) -> np.ndarray:
    """The item's clip as uint8 RGB (frames, size, size, 3): the shape moves linearly from start to end."""
    mask = shape_mask(str(item["shape"]), int(item["side"]))
    (x0, y0), (x1, y1) = item["start"], item["end"]
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        a = t / (frames - 1)
        x, y = round(x0 + (x1 - x0) * a), round(y0 + (y1 - y0) * a)
        video[t] = render_frame(size, str(item["color"]), mask, x, y)
    return video


def write_video(path: Path, item: dict[str, object], frames: int, size: int, fps: float) -> None:
    """Encode one item as H.264 yuv420p mp4 with byte-identical output for identical input."""
    write_mp4(render_video(item, frames, size), path, fps)


def write_image(path: Path, item: dict[str, object], size: int) -> None:
    """Save one item as a PNG (no timestamps, so bytes depend only on the pixels)."""
    mask = shape_mask(str(item["shape"]), int(item["side"]))
    x, y = item["start"]
    write_png(render_frame(size, str(item["color"]), mask, x, y), path)


# ---------------------------------------------------------------------------------------------------------
# Stage entry point
# ---------------------------------------------------------------------------------------------------------


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Delete media and captions listed by a previous run's manifest that this run does not rewrite."""
    manifest = out / MANIFEST
    try:
        previous = json.loads(manifest.read_text(encoding="utf-8"))["items"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    for entry in previous:
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or name in keep or Path(name).name != name:
            continue
        for stale in (out / name, (out / name).with_suffix(".txt")):
            stale.unlink(missing_ok=True)


def run_synth(out: Path, cfg: SynthConfig, progress: bool = True) -> SynthSummary:
    """Write `cfg.count` captioned items into `out`: round(count·image_fraction) PNG images, the rest mp4
    videos.

    Files are `video_NNNNN.mp4` / `image_NNNNN.png`, each with `same_stem.txt` holding its caption, plus
    `synth.json` with the parameters and one entry per item. Every (color, shape, direction) triple appears
    once the video count reaches 48 (count ≥ 64 at the default image fraction). Rerunning into the same
    folder overwrites the files and removes those a previous run listed that this one does not write.
    ValueError naming the field when `cfg` is invalid (`configs.validate.validate_synth`), before any
    file is written.
    """
    validate_synth(cfg)
    with folder_lock(out, "synth"):  # refuses a file, and a folder another job writes
        return _write_items(Path(out), cfg, progress)


def _write_items(out: Path, cfg: SynthConfig, progress: bool) -> SynthSummary:
    items = plan_items(cfg.count, cfg.size, cfg.seed, cfg.image_fraction, cfg.position_jitter, cfg.shape_size)
    _remove_stale(out, {str(item["file"]) for item in items})

    files: list[Path] = []
    with tqdm(total=len(items), desc="synth", unit="file", disable=not progress) as bar:
        for item in items:
            path = out / str(item["file"])
            if item["direction"] is None:
                write_image(path, item, cfg.size)
            else:
                write_video(path, item, cfg.frames, cfg.size, cfg.fps)
            write_text(path.with_suffix(".txt"), str(item["caption"]))
            files.append(path)
            bar.update(1)

    params = {
        **asdict(cfg),
        "codec": "libx264",
        "crf": CRF,
        "preset": PRESET,
        "x264_params": X264_PARAMS,
        "background": list(BACKGROUND),
        "colors": {name: list(rgb) for name, rgb in COLORS.items()},
    }
    write_text(out / MANIFEST, json.dumps({"params": params, "items": items}, indent=2) + "\n")
    remove_leftovers(out)  # every file is written: what a killed earlier run left half-written

    n_images = sum(item["direction"] is None for item in items)
    return SynthSummary(out=out, videos=len(items) - n_images, images=n_images, files=files)
