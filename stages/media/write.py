"""Media output: H.264 mp4 files and PNG contact sheets from uint8 RGB frame arrays.

Every writer goes through `stages.atomic.atomic_path`, so an interrupted job never leaves a half-written
file under the real name. The mp4 encoder is configured for byte-identical
output for identical input: single-threaded libx264 with a fixed preset, no macroblock-tree rate control
(see `X264_PARAMS`), and a bit-exact container without timestamps or library version strings.

Arrays use the frame layout (T, H, W, 3) uint8 RGB; a contact sheet takes one such video per row.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stages.atomic import atomic_path

CRF = 18
"""Default x264 constant rate factor (visually near-lossless)."""
PRESET = "medium"
"""x264 preset; fixed, since the preset changes the bytes."""
X264_PARAMS = "mbtree=0"
"""With macroblock-tree rate control on, x264 (core 165) gave different bytes for the same input from run to
run on small frames (seen at 18–48 px) even single-threaded, likely from uninitialised lookahead memory."""

SHEET_LABEL = (0, 0, 0)
SHEET_BACKGROUND = (255, 255, 255)
"""Contact sheets: black labels on white, white gaps between cells."""


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def _fps_fraction(fps: float) -> Fraction:
    """The frame rate as an exact rational (29.97 → 30000/1001), used as the stream's rate and time base."""
    return Fraction(fps).limit_denominator(1001)


def _check_video(video: object, what: str) -> np.ndarray:
    """Raise ValueError naming `what` unless `video` is a non-empty uint8 (T, H, W, 3) array."""
    if not isinstance(video, np.ndarray):
        raise ValueError(f"{what}: expected a numpy array (T, H, W, 3) uint8, got {type(video).__name__}")
    if video.dtype != np.uint8:
        raise ValueError(f"{what}: expected dtype uint8, got {video.dtype}")
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"{what}: expected shape (T, H, W, 3), got {video.shape}")
    if min(video.shape[:3]) < 1:
        raise ValueError(f"{what}: expected at least one frame of at least 1×1 pixels, got {video.shape}")
    return video


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Pad (T, H, W, 3) frames to even H and W by repeating the last row/column (yuv420p needs even sizes).

    Returns the input unchanged when both are already even.
    """
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


# ---------------------------------------------------------------------------------------------------------
# mp4
# ---------------------------------------------------------------------------------------------------------


def write_mp4(frames: np.ndarray, path: Path, fps: float, *, crf: int = CRF) -> None:
    """Encode uint8 RGB frames (T, H, W, 3) as an H.264 yuv420p mp4 at `fps`, atomically and reproducibly.

    Identical input gives identical bytes. An odd height or width is padded to the next even size by
    repeating the last row or column (see `pad_to_even`), so the file is at most one pixel larger each way.
    """
    path = Path(path)
    frames = _check_video(frames, f"write_mp4({path})")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"write_mp4({path}): fps must be a finite number > 0, got {fps!r}")
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"write_mp4({path}): crf must be an integer in [0, 51], got {crf!r}")
    frames = pad_to_even(frames)
    with atomic_path(path) as tmp:
        _encode(frames, tmp, _fps_fraction(fps), crf)


def _encode(frames: np.ndarray, tmp: Path, rate: Fraction, crf: int) -> None:
    # bitexact: no library version string; mp4 gets no creation_time unless one is set in metadata
    with av.open(str(tmp), "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        options = {"preset": PRESET, "crf": str(crf), "threads": "1", "x264-params": X264_PARAMS}
        stream = container.add_stream("libx264", rate=rate, options=options)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.time_base = 1 / rate
        for t, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), "rgb24")
            frame.pts = t
            frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush delayed (B-)frames


# ---------------------------------------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------------------------------------


def write_png(image: np.ndarray, path: Path) -> None:
    """Save a uint8 RGB (H, W, 3) image as a PNG, atomically (no timestamps: the bytes depend only on
    the pixels)."""
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------------------------
# Contact sheets
# ---------------------------------------------------------------------------------------------------------


def frame_indices(count: int, max_frames: int) -> np.ndarray:
    """min(count, max_frames) evenly spaced frame indices from 0 to count - 1 (first and last included)."""
    n = min(count, max_frames)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    return np.floor(np.linspace(0, count - 1, n) + 0.5).astype(np.int64)


def resize_frame(frame: np.ndarray, height: int) -> np.ndarray:
    """Scale an (H, W, 3) frame to `height` rows keeping its aspect (bicubic); unchanged at that height."""
    h, w = frame.shape[:2]
    if h == height:
        return frame
    width = max(1, round(w * height / h))
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))


def contact_sheet(
    rows: list[np.ndarray],
    path: Path,
    *,
    labels: list[str] | None = None,
    max_frames: int = 16,
    gap: int = 2,
) -> np.ndarray:
    """Save a PNG grid with one row per video and its frames across; return the sheet (H, W, 3) uint8.

    Each row shows at most `max_frames` evenly spaced frames (first and last included), scaled to the
    tallest row's height with their aspect kept, so videos of different sizes and lengths line up.
    White gaps of `gap` pixels separate the cells and frame the sheet; `labels`, one per row, are drawn
    in PIL's default font in a column to the left of the rows.
    """
    path = Path(path)
    if isinstance(rows, np.ndarray) or len(rows) == 0:
        raise ValueError(f"contact_sheet({path}): rows must be a non-empty list of (T, H, W, 3) arrays")
    rows = [_check_video(r, f"contact_sheet({path}) row {i}") for i, r in enumerate(rows)]
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"contact_sheet({path}): got {len(labels)} labels for {len(rows)} rows")
    if max_frames < 1 or gap < 0:
        raise ValueError(f"contact_sheet({path}): need max_frames >= 1 and gap >= 0, got {max_frames}, {gap}")

    height = max(r.shape[1] for r in rows)
    cells = [[resize_frame(r[i], height) for i in frame_indices(len(r), max_frames)] for r in rows]
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = 0
    if labels is not None:
        label_width = max(measure.textbbox((0, 0), text, font=font)[2] for text in labels) + gap
    row_widths = [sum(c.shape[1] for c in row) + gap * (len(row) - 1) for row in cells]
    sheet = Image.new(
        "RGB", (gap + label_width + max(row_widths) + gap, gap + len(rows) * (height + gap)), SHEET_BACKGROUND
    )
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(cells):
        y = gap + r * (height + gap)
        if labels is not None:
            top, bottom = measure.textbbox((0, 0), labels[r], font=font)[1::2]
            draw.text((gap, y + (height - (bottom - top)) // 2 - top), labels[r], fill=SHEET_LABEL, font=font)
        x = gap + label_width
        for cell in row:
            sheet.paste(Image.fromarray(cell), (x, y))
            x += cell.shape[1] + gap

    write_png(np.asarray(sheet), path)
    return np.asarray(sheet)
