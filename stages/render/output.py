"""Files of a render: per-prompt directories, stage outputs as safetensors, media and JSON, all atomic.

Layout of one prompt's directory `OUT/{index:04d}-{slug}/`:

- `stages/{k:02d}-{stage}.safetensors`  stage k's float32 output (C, T, H, W) in [-1, 1], with its
                                         settings and timing in the file's metadata (what resume reads);
- `stages/{k:02d}-{stage}.mp4`           earlier stages as H.264 (render.save_intermediate);
- `video.mp4`                            the last stage (`image.png` for a still-image cascade);
- `sheet.png`                            one row per stage, frames across (render.contact_sheet);
- `video.json`                           the sidecar, written last: the prompt's done marker.

Still images (fps 0) are written as PNG instead of mp4 (frames side by side if there are several).
`load_input_video` reads a user's clip as the input of an `upscale`.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from stages.atomic import atomic_path, write_text
from stages.media import ClipSpec, DecodeError, decode_file, write_mp4, write_png
from stages.sampling import to_uint8

SIDECAR = "video.json"
SLUG_LENGTH = 40
VIDEO_KEY = "video"


def slugify(text: str, limit: int = SLUG_LENGTH) -> str:
    """Lower-case ASCII letters, digits and single hyphens, at most `limit` characters ("prompt" if none)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    slug = slug[:limit].rstrip("-")
    return slug or "prompt"


def prompt_dir(out: Path, index: int, text: str) -> Path:
    """`out/{index:04d}-{slug}`."""
    return Path(out) / f"{index:04d}-{slugify(text)}"


def stage_path(job_dir: Path, k: int, name: str, suffix: str) -> Path:
    """`job_dir/stages/{k:02d}-{name}{suffix}`."""
    return Path(job_dir) / "stages" / f"{k:02d}-{name}{suffix}"


# ---------------------------------------------------------------------------------------------------
# Stage tensors
# ---------------------------------------------------------------------------------------------------


def save_video_tensor(path: Path, video: Tensor, metadata: dict[str, Any]) -> None:
    """Write a (C, T, H, W) float32 video atomically; `metadata` values are stored as JSON strings."""
    with atomic_path(Path(path)) as tmp:
        save_file(
            {VIDEO_KEY: video.detach().float().cpu().contiguous()},
            str(tmp),
            metadata={k: json.dumps(v) for k, v in metadata.items()},
        )


def read_video_metadata(path: Path) -> dict[str, Any] | None:
    """The metadata of a stage file, or None when it is missing or unreadable (then it is recomputed)."""
    if not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
            if VIDEO_KEY not in set(handle.keys()):
                return None
        return {k: json.loads(v) for k, v in raw.items()}
    except Exception:  # a damaged file is redone, never trusted
        return None


def load_video_tensor(path: Path) -> Tensor:
    """The (C, T, H, W) float32 video of a stage file (safetensors; never a pickle)."""
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(VIDEO_KEY).float()


# ---------------------------------------------------------------------------------------------------
# Media and JSON
# ---------------------------------------------------------------------------------------------------


def video_frames(video: Tensor) -> np.ndarray:
    """(C, T, H, W) in [-1, 1] → uint8 (T, H, W, 3)."""
    return to_uint8(video[None])[0]


def write_media(frames: np.ndarray, base: Path, fps: float) -> Path:
    """Write uint8 (T, H, W, 3) frames as `base.mp4` (fps > 0) or `base.png` (stills); returns the path."""
    if fps > 0:
        path = base.with_name(base.name + ".mp4")
        write_mp4(frames, path, fps)
        return path
    path = base.with_name(base.name + ".png")
    strip = np.concatenate(list(frames), axis=1)  # (H, T·W, 3): several stills side by side
    write_png(strip, path)
    return path


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Pretty JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None when the file is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def tensor_digest(video: Tensor) -> str:
    """A short content hash of a tensor (the fingerprint of an upscale input)."""
    data = video.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Upscale input
# ---------------------------------------------------------------------------------------------------


def load_input_video(path: str | Path, frames: int, height: int, width: int, fps: float) -> Tensor:
    """A user's clip (or image) as a stage input: `frames` frames at `fps` from the clip's start (the
    first frame for fps 0), each resized to cover height × width and center-cropped; float32
    (C, T, H, W) in [-1, 1]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"upscale input {path} does not exist")
    spec = ClipSpec(
        frames=frames,
        fps=float(fps) if fps > 0 else 1.0,
        stride=0,
        max_clips=1,
        scene_cut_threshold=0.0,
        resize="crop",
        height=height,
        width=width,
    )
    try:
        clip = decode_file(path, spec)[0]
    except DecodeError as err:
        raise ValueError(f"upscale input {path}: cannot decode ({err.stage}): {err.reason}") from None
    if fps > 0 and clip.kind == "image":
        raise ValueError(
            f"upscale input {path} is an image; this stage takes a {frames}-frame video at {fps:g} fps"
        )
    if len(clip.frames) < frames:
        have = len(clip.frames)
        raise ValueError(
            f"upscale input {path} gives {have} frame(s) at {fps:g} fps ({have / fps:.2f} s); the stage "
            f"input is {frames} frames ({frames / fps:.2f} s)"
        )
    pixels = torch.from_numpy(np.ascontiguousarray(clip.frames[:frames]))  # (T, H, W, 3) uint8
    return pixels.permute(3, 0, 1, 2).float() / 127.5 - 1.0  # (C, T, H, W)
