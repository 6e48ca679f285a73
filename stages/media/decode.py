"""Decoding videos and images into upright RGB clips at the target fps and size.

Videos go through decord (threaded, random access, only the frames needed) and fall back to PyAV
when decord cannot open a file, miscounts its frames, gives unusable timestamps or fails to read;
images go through PIL. Every failure is a `DecodeError` that names the file, the stage and the
reason, so the preprocessing job can record it and move on. Native crashes and hangs are not
handled here: the caller decodes in a killable process.

Behaviour worth knowing (measured on ../shared/media with decord 0.6 / PyAV 18):
- decord applies the display rotation itself; PyAV does not, so PyAV frames are rotated here.
- decord picks the largest video stream; PyAV's `streams.video[0]` may be a smaller one.
- decord's timestamps for the XviD AVI start with garbage (-3.7e17) and PyAV's frame pts there come
  out shuffled (B-frames in AVI): PyAV frame times are the sorted packet pts, in output order.
- decord opens the no-duration WebM not at all and fails to copy out 2×2 frames.

Frames are shrunk by the decoder while it converts them to RGB (libswscale, antialiased bilinear:
decord's `width`/`height`, PyAV's `reformat`) to the size that just covers the target, then center
cropped; converting and resizing full-size frames in Python would cost more than decoding them. The
displayed (rotated) size comes from the PyAV probe's first frame (decord) or the first decoded frame
(PyAV). Sources that would need enlarging, and decord-only mode (no probe), go through `resize_crop`
(PIL, also antialiased bilinear) like images.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stages.media.clips import (
    ClipSpec,
    center_crop,
    cover_size,
    frames_to_decode,
    grey_thumbnails,
    plan_clips,
    resample_indices,
    resize_crop,
    scene_cuts,
    target_size,
)

VIDEO_EXTENSIONS = frozenset(
    {"mp4", "mov", "mkv", "avi", "webm", "mpg", "mpeg", "ogv", "m4v", "wmv", "flv", "3gp", "ts"}
)
"""File extensions (lower case, no dot) decoded as videos."""
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
"""File extensions (lower case, no dot) decoded as single-frame images."""

DECODE_CHUNK = 8
"""Frames fetched per decord batch (each is resized at once, so memory stays bounded)."""
COUNT_TOLERANCE = (0.10, 2)
"""decord's frame count may differ from the container's by 10 % + 2 frames before we distrust it."""

# ---------------------------------------------------------------------------------------------------
# Results and errors
# ---------------------------------------------------------------------------------------------------


class DecodeError(Exception):
    """A file that cannot become clips: `stage` (open, probe, decode, image) and a `reason`.

    The message names the file when `path` is given. Keyword defaults keep it picklable, so it
    survives a trip through a process pipe or a Ray task.
    """

    def __init__(self, reason: str, *, stage: str = "decode", path: str | Path | None = None):
        super().__init__(f"{path}: {reason}" if path is not None else reason)
        self.stage = stage
        self.path = None if path is None else str(path)
        self.reason = reason


@dataclass(frozen=True, eq=False)
class Clip:
    """One clip: upright RGB frames at the target size and where they came from."""

    frames: np.ndarray
    """uint8 (T, H, W, 3)."""
    start_s: float
    """Target time of the first frame, seconds in the source (0.0 for images)."""
    end_s: float
    """start_s + T / fps: the end of the clip's last frame slot (0.0 for images)."""
    fps: float
    """Target frame rate (0.0 for images)."""
    size: tuple[int, int]
    """(H, W) of the frames."""
    source_size: tuple[int, int]
    """(h, w) of the upright source."""
    decoder: str
    """decord, pyav or pil."""
    kind: str
    """video or image."""
    source_times: tuple[float, ...] = field(default=())
    """Presentation time (seconds) of the source frame behind each output frame."""


class _DecordUnusable(Exception):
    """decord failed on a file in a way PyAV may handle (auto mode falls back)."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


# ---------------------------------------------------------------------------------------------------
# File checks and error reasons
# ---------------------------------------------------------------------------------------------------


def _check_file(path: Path, stage: str) -> None:
    if not path.exists():
        raise DecodeError("no such file", stage=stage, path=path)
    if not path.is_file():
        raise DecodeError("not a regular file", stage=stage, path=path)
    if path.stat().st_size == 0:
        raise DecodeError("0 bytes (empty file)", stage=stage, path=path)


def _sniff(path: Path) -> str | None:
    """A plain-words diagnosis of a file no demuxer accepts: text, or an MP4/MOV without its index."""
    head = path.read_bytes()[:512] if path.stat().st_size else b""
    if head and b"\0" not in head:
        try:
            head.decode("utf-8")
            return "text file, not a video (no media container found)"
        except UnicodeDecodeError:
            pass
    if head[4:8] == b"ftyp":
        return "truncated or damaged MP4/MOV: its index (moov atom) cannot be read"
    return None


def _open_failure_reason(path: Path, exc: BaseException) -> str:
    """Why a container would not open, in words: text, truncated MP4, or the decoder's own message."""
    hint = _sniff(path)
    return f"{hint} ({exc})" if hint else f"cannot open as a video container: {exc}"


def _check_side(path: Path, h: int, w: int, spec: ClipSpec) -> None:
    if min(h, w) < spec.min_source_side:
        raise DecodeError(
            f"too small: {w}x{h}, shorter side below min_source_side={spec.min_source_side}",
            stage="probe",
            path=path,
        )


# ---------------------------------------------------------------------------------------------------
# PyAV
# ---------------------------------------------------------------------------------------------------


def _largest_video_stream(container):
    """The video stream with the most pixels (decord's choice too), or None."""
    streams = [s for s in container.streams.video if (s.width or 0) * (s.height or 0) > 0]
    return max(streams, key=lambda s: s.width * s.height) if streams else None


@dataclass(frozen=True)
class _Probe:
    index: int
    height: int
    width: int
    expected_frames: float | None
    upright: tuple[int, int] | None
    """(h, w) as displayed (display rotation applied), from the first frame; None if it did not decode."""


def _open_container(path: Path):
    """PyAV container of `path`, or a DecodeError saying why it cannot be opened."""
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise DecodeError(_open_failure_reason(path, exc), stage="open", path=path) from exc


def _pyav_probe(path: Path, spec: ClipSpec) -> _Probe:
    """Container metadata: the stream decord and we use, its frame count, and its displayed size (the
    display rotation is only known from a decoded frame, so the first one is decoded)."""
    with _open_container(path) as container:
        stream = _largest_video_stream(container)
        if stream is None:
            audio = len(container.streams.audio)
            what = f"audio only: {audio} audio stream(s)" if audio else "audio only?"
            raise DecodeError(f"no video stream ({what})", stage="probe", path=path)
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        if stream.frames:
            expected: float | None = float(stream.frames)
        elif stream.duration and stream.time_base and rate:
            expected = float(stream.duration * stream.time_base) * rate
        elif container.duration and rate:
            expected = container.duration / 1e6 * rate
        else:
            expected = None
        h, w = int(stream.height), int(stream.width)
        _check_side(path, h, w, spec)
        upright = None
        stream.codec_context.thread_count = 1
        try:
            frame = next(container.decode(stream), None)
        except av.FFmpegError:
            frame = None
        if frame is not None:
            upright = _displayed_size(frame)
    return _Probe(stream.index, h, w, expected, upright)


def _quarter_turn(rotation: float) -> bool:
    """Whether an FFmpeg display rotation swaps width and height (±90°, ±270°)."""
    return round((rotation or 0) / 90.0) % 2 == 1


def _displayed_size(frame) -> tuple[int, int]:
    """(h, w) of a PyAV frame as displayed, its rotation applied."""
    if _quarter_turn(getattr(frame, "rotation", 0)):
        return (frame.width, frame.height)
    return (frame.height, frame.width)


def _rotate_upright(frame: np.ndarray, rotation: float) -> np.ndarray:
    """Apply an FFmpeg display rotation (counter-clockwise degrees) so the frame shows upright."""
    k = round((rotation or 0) / 90.0) % 4
    return np.rot90(frame, k) if k else frame


class _Fit:
    """The clip geometry, settled by the first upright frame: source size, clip size and the size the
    decoder should scale to (None: decode at full size and `resize_crop`)."""

    def __init__(self, path: Path, spec: ClipSpec):
        self.path, self.spec = path, spec
        self.source_size: tuple[int, int] | None = None
        self.size: tuple[int, int] = (0, 0)
        self.scaled: tuple[int, int] | None = None

    def settle(self, h: int, w: int) -> None:
        _check_side(self.path, h, w, self.spec)
        self.source_size = (int(h), int(w))
        self.size = target_size(h, w, self.spec)
        self.scaled = cover_size(h, w, self.size)

    def finish(self, frame: np.ndarray) -> np.ndarray:
        """A full-size or decoder-scaled upright frame → the clip size."""
        if self.scaled is not None and frame.shape[:2] == self.scaled:
            return center_crop(frame, self.size)
        return resize_crop(frame, self.size)


class _PyavVideo:
    """Sequential PyAV decoding; frame times are the stream's sorted packet pts, in output order."""

    name = "pyav"

    def __init__(self, path: Path, threads: int):
        self.path = path
        self.threads = threads
        with _open_container(path) as container:
            stream = _largest_video_stream(container)
            if stream is None:
                raise DecodeError("no video stream (audio only?)", stage="probe", path=path)
            self.index = stream.index
            self.timestamps = self._scan(container, stream)
        if self.timestamps.size == 0:
            raise DecodeError("no video packets in the stream", stage="probe", path=path)

    @staticmethod
    def _scan(container, stream) -> np.ndarray:
        """Presentation times of every frame from packet headers only (no decoding).

        Decoders emit frames in presentation order, so the sorted pts of the non-empty, non-discarded
        packets give each output frame its time, also where frame pts come out shuffled (AVI with
        packed B-frames). Packets without pts use dts; without either, the previous time + 1/rate.
        """
        time_base = float(stream.time_base or 0) or 1.0 / 90000
        step = 1.0 / float(stream.average_rate or stream.guessed_rate or 25)
        times: list[float] = []
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:
                    continue
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is not None:
                    times.append(float(ts) * time_base)
                else:
                    times.append(times[-1] + step if times else 0.0)
        except av.FFmpegError:
            pass  # truncated tail: keep the packets read so far
        return np.sort(np.asarray(times, dtype=np.float64))

    def read(self, wanted: np.ndarray, fit: _Fit) -> Iterator[tuple[int, np.ndarray]]:
        """One sequential pass yielding (frame index, frame at the clip size) for sorted `wanted` indices.

        The k-th decoded frame is frame k of the scan (frames' own pts are not trusted: shuffled in
        AVI, missing in some streams), except that when the decoder drops leading frames (open GOP,
        a stream cut mid-GOP) the first frame's pts re-anchors k. Stops after the last wanted frame.
        """
        if wanted.size == 0:
            return
        targets = iter(int(i) for i in wanted)
        need: int | None = next(targets)
        k = 0
        with av.open(str(self.path)) as container:
            stream = container.streams[self.index]
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = self.threads
            time_base = float(stream.time_base or 0)
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.FFmpegError:
                    continue  # a damaged packet: the decoder conceals what it can
                for frame in frames:
                    if k == 0 and frame.pts is not None and time_base:
                        k = self._anchor(frame.pts * time_base)
                        while need is not None and need < k:
                            need = next(targets, None)
                    if k == need:
                        yield k, fit.finish(self._upright(frame, fit))
                        need = next(targets, None)
                    if need is None:
                        return
                    k += 1

    @staticmethod
    def _upright(frame, fit: _Fit) -> np.ndarray:
        """Upright RGB, scaled by libswscale to fit.scaled once the first frame has settled it."""
        rotation = getattr(frame, "rotation", 0) or 0
        if fit.source_size is None:
            fit.settle(*_displayed_size(frame))
        if fit.scaled is None:
            rgb = frame.to_ndarray(format="rgb24")
        else:
            sh, sw = fit.scaled
            coded_h, coded_w = (sw, sh) if _quarter_turn(rotation) else (sh, sw)
            rgb = frame.reformat(width=coded_w, height=coded_h, format="rgb24", interpolation="BILINEAR")
            rgb = rgb.to_ndarray()
        return _rotate_upright(rgb, rotation)

    def _anchor(self, first_time: float) -> int:
        """Scan index of the first decoded frame: 0, or later when leading frames were dropped."""
        j = int(np.searchsorted(self.timestamps, first_time - 1e-6))
        if j < self.timestamps.size and abs(self.timestamps[j] - first_time) < 1e-6:
            return j
        return 0


# ---------------------------------------------------------------------------------------------------
# decord
# ---------------------------------------------------------------------------------------------------


class _DecordVideo:
    """decord random access; rotation applied by decord; checked against the container metadata.

    With `scaled` = (h, w) the reader shrinks frames to that displayed size while converting them.
    decord 0.6 cannot copy out some widths (16, 24, 48, 72 px fail its size check); then the file is
    reopened at full size and frames are resized with `resize_crop`.
    """

    name = "decord"

    def __init__(
        self, path: Path, threads: int, probe: _Probe | None, strict: bool, scaled: tuple[int, int] | None
    ):
        self.path, self.threads, self.scaled = path, threads, scaled
        try:
            self.reader = self._open()
            n = len(self.reader)
            raw = self.reader.get_frame_timestamp(np.arange(n))
        except Exception as exc:  # decord raises DECORDError, RuntimeError, AssertionError, ...
            if "cannot find video stream" in str(exc):
                raise _DecordUnusable("probe", "no video stream (audio only?)") from exc
            hint = _sniff(path)
            raise _DecordUnusable("open", f"decord cannot open it: {hint or _short(exc)}") from exc
        if probe is not None and probe.expected_frames is not None:
            expected = probe.expected_frames
            if abs(n - expected) > COUNT_TOLERANCE[0] * expected + COUNT_TOLERANCE[1]:
                raise _DecordUnusable(
                    "probe", f"decord counts {n} frames, the container about {expected:.0f}"
                )
        ts = np.asarray(raw, dtype=np.float64).reshape(n, -1)[:, 0]
        if not (np.all(np.isfinite(ts)) and np.all(np.diff(ts) > 0) and ts[0] > -1.0):
            if not strict:
                raise _DecordUnusable("probe", "decord timestamps are not increasing (or NaN)")
            ts = np.arange(n, dtype=np.float64) / float(self.reader.get_avg_fps() or 25.0)
        self.timestamps = ts

    def _open(self):
        from decord import VideoReader, cpu

        h, w = self.scaled or (-1, -1)
        return VideoReader(str(self.path), ctx=cpu(0), num_threads=self.threads, width=w, height=h)

    def read(self, wanted: np.ndarray, fit: _Fit) -> Iterator[tuple[int, np.ndarray]]:
        """(frame index, frame at the clip size) for sorted `wanted` indices, DECODE_CHUNK at a time."""
        for lo in range(0, wanted.size, DECODE_CHUNK):
            chunk = [int(i) for i in wanted[lo : lo + DECODE_CHUNK]]
            try:
                try:
                    batch = self.reader.get_batch(chunk).asnumpy()
                except Exception:
                    if lo or self.scaled is None:
                        raise
                    self.scaled = None  # the scaled-width copy-out bug: full size instead
                    self.reader = self._open()
                    batch = self.reader.get_batch(chunk).asnumpy()
            except Exception as exc:
                raise _DecordUnusable("decode", f"decord cannot read frames: {_short(exc)}") from exc
            if fit.source_size is None:
                fit.settle(*batch.shape[1:3])
            yield from zip(chunk, (fit.finish(frame) for frame in batch))


def _short(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1][-200:] if lines else ''}"


# ---------------------------------------------------------------------------------------------------
# Videos
# ---------------------------------------------------------------------------------------------------


def _clips_from(video: _PyavVideo | _DecordVideo, path: Path, spec: ClipSpec, fit: _Fit) -> list[Clip]:
    """Resample by timestamps, decode only the needed frames (resized at once), cut, plan, slice."""
    indices, times = resample_indices(video.timestamps, spec.fps)
    n = frames_to_decode(len(indices), spec)
    indices, times = indices[:n], times[:n]
    resized = dict(video.read(np.unique(indices), fit))
    if fit.source_size is None or not resized:
        raise DecodeError("no frame could be decoded", stage="decode", path=path)
    source_size, size = fit.source_size, fit.size
    # frames the decoder never produced (truncated tail, dropped leading frames): keep the first run
    have = np.isin(indices, list(resized))
    first = int(np.argmax(have))
    stop = first + int(np.argmin(have[first:])) if not have[first:].all() else have.size
    indices, times = indices[first:stop], times[first:stop]
    n = len(indices)
    thumbs = dict(zip(resized, grey_thumbnails(np.stack(list(resized.values())))))
    cuts = scene_cuts(np.stack([thumbs[int(i)] for i in indices]), spec.scene_cut_threshold)
    plan = plan_clips(n, cuts, spec)
    if not plan:
        raise DecodeError(
            f"{n} frame(s) at {spec.fps:g} fps: no clip of {spec.frames} frames between scene cuts "
            f"(short clips need a multiple of {spec.frame_multiple})",
            stage="decode",
            path=path,
        )
    ts = video.timestamps
    return [
        Clip(
            frames=np.stack([resized[int(i)] for i in indices[a:b]]),
            start_s=float(times[a]),
            end_s=float(times[a] + (b - a) / spec.fps),
            fps=float(spec.fps),
            size=(int(size[0]), int(size[1])),
            source_size=source_size,
            decoder=video.name,
            kind="video",
            source_times=tuple(float(ts[i]) for i in indices[a:b]),
        )
        for a, b in plan
    ]


def decode_video(path: str | Path, spec: ClipSpec) -> list[Clip]:
    """Clips of spec.frames upright RGB frames at spec.fps and the target size from one video.

    decoder=auto probes the container with PyAV, decodes with decord and falls back to PyAV when
    decord cannot open or read the file, miscounts its frames or gives unusable timestamps;
    decord and pyav use only that decoder. Raises DecodeError with the stage and a reason.
    """
    path = Path(path)
    try:
        _check_file(path, "open")
        probe = _pyav_probe(path, spec) if spec.decoder in ("auto", "pyav") else None
        if spec.decoder in ("auto", "decord"):
            fit = _Fit(path, spec)
            if probe is not None and probe.upright is not None:
                fit.settle(*probe.upright)
            try:
                video = _DecordVideo(path, spec.threads, probe, spec.decoder == "decord", fit.scaled)
                return _clips_from(video, path, spec, fit)
            except _DecordUnusable as exc:
                if spec.decoder == "decord":
                    raise DecodeError(exc.reason, stage=exc.stage, path=path) from exc
        return _clips_from(_PyavVideo(path, spec.threads), path, spec, _Fit(path, spec))
    except DecodeError:
        raise
    except Exception as exc:  # a bad file must become a reason, never a crash of the job
        raise DecodeError(f"unexpected {type(exc).__name__}: {exc}", stage="decode", path=path) from exc


# ---------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode → (h, w, 3) uint8: alpha over white, 16/32-bit and float scaled to 0-255."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif mode == "F" and arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        elif mode == "I" and arr.size and arr.max() > 255:
            arr = arr / (257.0 if arr.max() <= 65535 else arr.max() / 255.0)
        grey = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode_image(path: str | Path, spec: ClipSpec) -> Clip:
    """A one-frame clip from an image: EXIF orientation applied, any mode → RGB, resized/cropped."""
    path = Path(path)
    _check_file(path, "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                upright = ImageOps.exif_transpose(img)
                rgb = _to_rgb(upright)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(
            f"too many pixels (decompression-bomb guard, limit {Image.MAX_IMAGE_PIXELS}): {exc}",
            stage="image",
            path=path,
        ) from exc
    except UnidentifiedImageError as exc:
        raise DecodeError(
            "cannot identify image file (not an image, or damaged)", stage="image", path=path
        ) from exc
    except Exception as exc:  # OSError (truncated), SyntaxError, ValueError, ... from PIL plugins
        raise DecodeError(
            f"cannot decode image: {type(exc).__name__}: {exc}", stage="image", path=path
        ) from exc
    h, w = rgb.shape[:2]
    _check_side(path, h, w, spec)
    size = target_size(h, w, spec)
    frames = resize_crop(rgb, size)[None]
    return Clip(
        frames=frames,
        start_s=0.0,
        end_s=0.0,
        fps=0.0,
        size=(int(size[0]), int(size[1])),
        source_size=(int(h), int(w)),
        decoder="pil",
        kind="image",
        source_times=(0.0,),
    )


def decode_file(path: str | Path, spec: ClipSpec) -> list[Clip]:
    """Clips from a video or image, chosen by the file extension."""
    path = Path(path)
    ext = path.suffix.lower().lstrip(".")
    if ext in VIDEO_EXTENSIONS:
        return decode_video(path, spec)
    if ext in IMAGE_EXTENSIONS:
        return [decode_image(path, spec)]
    raise DecodeError(
        f"unsupported extension '.{ext}' (expected a video: {', '.join(sorted(VIDEO_EXTENSIONS))}; "
        f"or an image: {', '.join(sorted(IMAGE_EXTENSIONS))})",
        stage="open",
        path=path,
    )
