"""Decoding real clips and photos (../shared/media) and a corpus of bad inputs into upright RGB clips."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pickle
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from configs import load_config
from stages.media import decode as decode_mod
from stages.media.clips import ClipSpec, cover_size
from stages.media.decode import (
    Clip,
    DecodeError,
    decode_file,
    decode_image,
    decode_video,
)

HAS_DECORD = importlib.util.find_spec("decord") is not None
needs_decord = pytest.mark.skipif(not HAS_DECORD, reason="decord is not installed (x86_64 only)")

DECORD_CANNOT_OPEN = "dark_mediarecorder_vp9_1280x720_no_duration_audio.webm"
DECORD_BAD_TIMESTAMPS = "eye_makeup_mpeg4_320x240_25fps_audio.avi"
ROT90 = "keyboard_rot90_h264_568x320_30fps_3frames.mov"
PLAIN = "keyboard_h264_568x320_30fps_3frames.mov"
VFR = "two_people_vfr_h264_1920x1080.mp4"
H264 = "bikes_h264_640x272_25fps.mp4"
NASA = "nasa_two_video_streams_h264_480x270_29.97fps_and_320x180_25fps_audio.mp4"
MICROSCOPE = "microscope_bulk_water_h264_640x424_23.976fps.mov"


def _spec(*overrides: str) -> ClipSpec:
    base = [
        "data.frames=4",
        "data.height=32",
        "data.width=32",
        "data.fps=8",
        "preprocess.max_clips_per_video=2",
    ]
    return ClipSpec.from_config(load_config(overrides=[*base, *overrides]))


def _write_video(path: Path, w: int, h: int, n: int, rate: int = 8) -> Path:
    """An n-frame video of slowly brightening grey (no scene cuts), H.264 (mpeg4 if x264 refuses)."""
    for codec in ("libx264", "mpeg4"):
        try:
            with av.open(str(path), "w", format="mp4") as out:
                stream = out.add_stream(codec, rate=rate)
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                for i in range(n):
                    img = np.full((h, w, 3), 60 + 8 * i, dtype=np.uint8)
                    for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                        out.mux(packet)
                for packet in stream.encode():
                    out.mux(packet)
            return path
        except av.FFmpegError:
            continue
    pytest.skip(f"this FFmpeg build cannot encode a {w}x{h} video")


def _write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 16000, i * 1024, Fraction(1, 16000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _packet_times(path: Path) -> np.ndarray:
    """Sorted presentation times of the largest video stream, straight from PyAV (reference)."""
    with av.open(str(path)) as c:
        s = max(c.streams.video, key=lambda s: s.width * s.height)
        pts = [p.pts for p in c.demux(s) if p.size and p.pts is not None]
        return np.sort(np.array(pts, dtype=np.float64) * float(s.time_base))


# ---------------------------------------------------------------------------------------------------
# Every real file gives clips
# ---------------------------------------------------------------------------------------------------


def test_every_media_file_gives_clips(media, media_name):
    spec = _spec()
    clips = decode_file(media(media_name), spec)
    assert clips, media_name
    for clip in clips:
        assert isinstance(clip, Clip)
        assert clip.frames.dtype == np.uint8 and clip.frames.shape[1:] == (32, 32, 3)
        assert clip.size == (32, 32) and min(clip.source_size) >= spec.min_source_side
        assert 1 <= clip.frames.shape[0] <= spec.frames and clip.frames.std() > 0  # real pixels
    if media_name.lower().endswith((".png", ".jpg")):
        assert clips[0].kind == "image" and clips[0].decoder == "pil" and clips[0].frames.shape[0] == 1
        return
    assert clips[0].kind == "video" and clips[0].decoder in ("decord", "pyav")
    assert len(clips) <= spec.max_clips and all(c.fps == spec.fps for c in clips)
    assert all(c.end_s == pytest.approx(c.start_s + c.frames.shape[0] / c.fps) for c in clips)
    if media_name in (DECORD_CANNOT_OPEN, DECORD_BAD_TIMESTAMPS) or not HAS_DECORD:
        assert clips[0].decoder == "pyav"  # auto mode fell back
    else:
        assert clips[0].decoder == "decord"


@needs_decord
def test_decord_frame_count_disagreeing_with_the_container_falls_back(media, monkeypatch):
    real_probe = decode_mod._pyav_probe

    def inflated(path, spec):  # pretend the container announces twice the frames decord finds
        probe = real_probe(path, spec)
        return dataclasses.replace(probe, expected_frames=2 * probe.expected_frames)

    monkeypatch.setattr(decode_mod, "_pyav_probe", inflated)
    clips = decode_video(media(H264), _spec())
    assert clips and all(c.decoder == "pyav" for c in clips)
    monkeypatch.setattr(decode_mod, "_pyav_probe", real_probe)
    assert decode_video(media(H264), _spec())[0].decoder == "decord"


def test_decode_error_names_file_stage_reason_and_pickles(media):
    err = DecodeError("0 bytes (empty file)", stage="open", path="/data/a.mp4")
    assert (err.stage, err.path, err.reason) == ("open", "/data/a.mp4", "0 bytes (empty file)")
    assert str(err) == "/data/a.mp4: 0 bytes (empty file)"
    back = pickle.loads(pickle.dumps(err))
    assert (back.stage, back.path, back.reason, str(back)) == (err.stage, err.path, err.reason, str(err))
    assert DecodeError("plain").stage == "decode"
    clip = decode_image(media("photo_coffee_600x400.png"), _spec())
    again = pickle.loads(pickle.dumps(clip))  # clips cross process pipes
    np.testing.assert_array_equal(again.frames, clip.frames)
    assert (again.size, again.source_size, again.kind) == (clip.size, clip.source_size, clip.kind)


@needs_decord
def test_decord_only_mode_does_not_fall_back(media):
    with pytest.raises(DecodeError) as err:
        decode_video(media(DECORD_CANNOT_OPEN), _spec("preprocess.decoder=decord"))
    assert err.value.stage == "open" and "decord" in str(err.value)
    assert DECORD_CANNOT_OPEN in str(err.value)


# ---------------------------------------------------------------------------------------------------
# Rotation, VFR, decoder agreement, stream choice
# ---------------------------------------------------------------------------------------------------


@needs_decord
def test_rotated_clip_comes_out_upright_with_both_decoders(media):
    spec = _spec("data.fps=30", "preprocess.resize=bucket", "preprocess.buckets=[[32,16],[16,32]]")
    by_decoder = {}
    for decoder in ("decord", "pyav"):
        (clip,) = decode_video(media(ROT90), dataclasses.replace(spec, decoder=decoder))
        assert clip.decoder == decoder
        assert clip.source_size == (568, 320)  # portrait: coded 568x320, displayed rotated
        assert clip.size == (32, 16) and clip.frames.shape == (3, 32, 16, 3)  # portrait bucket
        by_decoder[decoder] = clip.frames.astype(np.float32)
    assert np.abs(by_decoder["decord"] - by_decoder["pyav"]).mean() < 3.0
    # the unrotated twin is landscape; the rotated one holds the same picture turned 90° clockwise
    (plain,) = decode_video(media(PLAIN), dataclasses.replace(spec, decoder="pyav"))
    assert plain.source_size == (320, 568) and plain.size == (16, 32)


@pytest.mark.parametrize("decoder", [pytest.param("decord", marks=needs_decord), "pyav"])
def test_vfr_clips_are_evenly_timed(media, decoder):
    path = media(VFR)
    spec = _spec("data.fps=10", "preprocess.max_clips_per_video=0", "preprocess.scene_cut_threshold=0")
    clips = decode_video(path, dataclasses.replace(spec, decoder=decoder))
    ts = _packet_times(path)
    assert np.diff(ts).max() > 2.5 * np.median(np.diff(ts))  # the file really is VFR
    assert len(clips) == int((ts[-1] + np.median(np.diff(ts)) - ts[0]) * 10) // 4
    repeats = 0
    for clip in clips:
        targets = clip.start_s + np.arange(clip.frames.shape[0]) / clip.fps  # evenly spaced by design
        chosen = np.array(clip.source_times)
        for t, s in zip(targets, chosen):
            i = int(np.argmin(np.abs(ts - s)))
            assert abs(ts[i] - s) < 1e-3, "a chosen frame is a real source frame"
            assert ts[i] <= t + 2e-4 and (i + 1 == len(ts) or t < ts[i + 1]), "frame on screen at t"
        repeats += int(np.sum(np.diff(chosen) == 0))
    assert np.allclose(np.diff([c.start_s for c in clips]), 0.4)
    assert repeats >= 1  # the 200 ms gap holds one frame over two target times


@needs_decord
def test_decord_and_pyav_agree_on_plain_h264(media):
    path = media(H264)
    a = decode_video(path, _spec("preprocess.decoder=decord"))
    b = decode_video(path, _spec("preprocess.decoder=pyav"))
    assert [c.decoder for c in a] == ["decord", "decord"] and [c.decoder for c in b] == ["pyav", "pyav"]
    for ca, cb in zip(a, b, strict=True):
        np.testing.assert_allclose(ca.source_times, cb.source_times, atol=1e-3)
        assert (ca.start_s, ca.end_s, ca.source_size) == (cb.start_s, cb.end_s, cb.source_size)
        assert np.abs(ca.frames.astype(np.float32) - cb.frames).mean() < 2.0


@needs_decord
def test_pyav_picks_the_largest_of_two_video_streams(media):
    path = media(NASA)
    with av.open(str(path)) as c:
        assert (c.streams.video[0].width, c.streams.video[0].height) == (320, 180)  # the trap
    (clip, *_) = decode_video(path, _spec("preprocess.decoder=pyav"))
    assert clip.decoder == "pyav" and clip.source_size == (270, 480)
    (ref, *_) = decode_video(path, _spec("preprocess.decoder=decord"))
    assert ref.source_size == (270, 480)
    assert np.abs(ref.frames.astype(np.float32) - clip.frames).mean() < 2.0


def test_only_the_needed_frames_are_decoded(media, monkeypatch):
    asked: list[np.ndarray] = []
    original = decode_mod._PyavVideo.read

    def spy(self, wanted, fit):
        asked.append(np.asarray(wanted))
        return original(self, wanted, fit)

    monkeypatch.setattr(decode_mod._PyavVideo, "read", spy)
    clips = decode_video(media(H264), _spec("preprocess.decoder=pyav", "preprocess.stride=6"))
    assert [(c.start_s, c.frames.shape[0]) for c in clips] == [(0.0, 4), (0.75, 4)]
    # 250 source frames; at 8 fps with 2 clips every 6 frames at most 2·6 + 4 resampled frames
    assert len(asked) == 1 and asked[0].size <= 16 and asked[0].max() < 60


def test_pyav_reanchors_when_the_decoder_drops_leading_frames(media, monkeypatch):
    path = media(H264)
    spec = _spec("preprocess.decoder=pyav", "data.fps=25")
    reference = decode_video(path, spec)
    real_scan = decode_mod._PyavVideo._scan

    def with_ghosts(container, stream):  # two leading packets whose frames never come out
        ts = real_scan(container, stream)
        return np.concatenate([[ts[0] - 0.08, ts[0] - 0.04], ts])

    monkeypatch.setattr(decode_mod._PyavVideo, "_scan", staticmethod(with_ghosts))
    clips = decode_video(path, spec)
    assert len(clips) == len(reference)
    for got, ref in zip(clips, reference, strict=True):
        assert got.source_times == pytest.approx(ref.source_times) and got.start_s == pytest.approx(
            ref.start_s
        )
        np.testing.assert_array_equal(got.frames, ref.frames)


# ---------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------


def _bad(path: Path, spec: ClipSpec | None = None) -> DecodeError:
    with pytest.raises(DecodeError) as err:
        decode_file(path, spec or _spec())
    assert str(path) in str(err.value)
    return err.value


@pytest.mark.parametrize("decoder", ["auto", pytest.param("decord", marks=needs_decord), "pyav"])
def test_bad_videos_give_reasons(tmp_path, decoder):
    spec = _spec(f"preprocess.decoder={decoder}")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    err = _bad(empty, spec)
    assert err.stage == "open" and "0 bytes" in err.reason

    text = tmp_path / "notes.mp4"
    text.write_text("this is a caption, not a video\n" * 20)
    err = _bad(text, spec)
    assert err.stage == "open" and "text file" in err.reason

    audio = _write_audio_only(tmp_path / "speech.mp4")
    err = _bad(audio, spec)
    assert err.stage == "probe" and "no video stream" in err.reason


def test_truncated_mp4(media, tmp_path):
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(media(H264).read_bytes()[:2048])
    err = _bad(truncated)
    assert err.stage == "open" and "truncated" in err.reason


def test_tiny_video_too_small_or_upscaled(tmp_path):
    tiny = _write_video(tmp_path / "tiny.mp4", 2, 2, 5)
    err = _bad(tiny)
    assert err.stage == "probe" and "too small" in err.reason and "2x2" in err.reason
    (clip,) = decode_video(tiny, _spec("preprocess.min_source_side=1"))
    # decord opens it but cannot copy out 2x2 frames: auto mode falls back to PyAV
    assert clip.decoder == "pyav" and clip.frames.shape == (4, 32, 32, 3) and clip.source_size == (2, 2)


def test_a_width_decord_cannot_copy_out_falls_back_to_pyav(tmp_path):
    """decord 0.6 fails its copy-out size check for 16-px-wide frames, scaled or not."""
    small = _write_video(tmp_path / "small.mp4", 16, 16, 8)
    (clip, *_) = decode_video(small, _spec("data.height=8", "data.width=8", "data.fps=8"))
    assert clip.decoder == "pyav" and clip.frames.shape[1:] == (8, 8, 3) and clip.source_size == (16, 16)


def test_one_frame_video(tmp_path):
    one = _write_video(tmp_path / "one.mp4", 64, 48, 1)
    for decoder in ("auto", "pyav"):
        clips = decode_video(one, _spec(f"preprocess.decoder={decoder}"))
        assert len(clips) == 1 and clips[0].frames.shape == (1, 32, 32, 3)
        assert clips[0].source_size == (48, 64)
    err = _bad(one, _spec("model.patch_size=[2,2,2]"))  # pt=2 needs two frames: no clip, no padding
    assert err.stage == "decode" and "1 frame" in err.reason


def test_unsupported_extension(tmp_path):
    odd = tmp_path / "clip.xyz"
    odd.write_bytes(b"abc")
    err = _bad(odd)
    assert err.stage == "open" and "unsupported extension" in err.reason
    missing = _bad(tmp_path / "gone.mp4")
    assert missing.stage == "open" and "no such file" in missing.reason


# ---------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------


def test_corrupt_and_truncated_png(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    err = _bad(corrupt)
    assert err.stage == "image" and ("cannot identify" in err.reason or "cannot decode" in err.reason)

    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    half = tmp_path / "half.png"
    half.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    err = _bad(half)
    assert err.stage == "image" and "truncated" in err.reason

    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert _bad(empty).stage == "image"


@pytest.mark.parametrize("shape", [(10000, 16), (16, 10000)])
def test_extreme_aspect_image(tmp_path, shape):
    path = tmp_path / "strip.png"
    Image.fromarray(np.full((*shape, 3), 90, dtype=np.uint8)).save(path)
    clip = decode_image(path, _spec())
    assert clip.frames.shape == (1, 32, 32, 3) and clip.source_size == shape
    assert np.all(clip.frames == 90)


def _image(mode: str) -> Image.Image:
    rgb = np.zeros((24, 40, 3), dtype=np.uint8)
    rgb[:, :20] = (250, 10, 10)
    rgb[:, 20:] = (10, 10, 250)
    img = Image.fromarray(rgb)
    if mode == "I;16":
        img16 = Image.fromarray(np.full((24, 40), 65535, dtype=np.uint16))
        assert img16.mode == "I;16"
        return img16
    if mode == "F":
        return Image.fromarray(np.full((24, 40), 0.5, dtype=np.float32))
    if mode == "P":
        return img.quantize(8)
    return img.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16", "I", "F"])
def test_any_image_mode_becomes_rgb(tmp_path, mode):
    img = _image(mode)
    path = tmp_path / ("img.tif" if mode in ("CMYK", "F", "I;16", "I") else "img.png")
    img.save(path)
    clip = decode_image(path, _spec())
    assert clip.frames.shape == (1, 32, 32, 3) and clip.frames.dtype == np.uint8
    assert (clip.kind, clip.decoder, clip.fps, clip.start_s, clip.end_s) == ("image", "pil", 0.0, 0.0, 0.0)
    assert clip.source_size == (24, 40)
    if mode == "I;16":
        assert np.all(clip.frames == 255)  # 16-bit full scale is white, not clipped garbage
    if mode == "F":
        assert np.all(np.abs(clip.frames.astype(int) - 128) <= 1)


def test_transparent_pixels_become_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(path)
    assert np.all(decode_image(path, _spec()).frames == 255)


def test_exif_orientation_is_applied(tmp_path):
    rgb = np.zeros((20, 40, 3), dtype=np.uint8)  # stored landscape: left red, right blue
    rgb[:, :20] = (255, 0, 0)
    rgb[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    path = tmp_path / "phone.jpg"
    Image.fromarray(rgb).save(path, exif=exif, quality=95)
    clip = decode_image(path, _spec())
    assert clip.source_size == (40, 20)  # upright portrait
    top, bottom = clip.frames[0, 4].astype(int), clip.frames[0, -4].astype(int)
    assert top[:, 0].mean() > 200 and top[:, 2].mean() < 60  # left (red) went to the top
    assert bottom[:, 2].mean() > 200 and bottom[:, 0].mean() < 60


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 4096 px: over twice the limit → PIL error
    err = _bad(path)
    assert err.stage == "image" and "decompression-bomb" in err.reason
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between 1× and 2×: PIL only warns
    err = _bad(path)
    assert err.stage == "image" and "decompression-bomb" in err.reason


def test_tiny_image_too_small(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (3, 3), (9, 9, 9)).save(path)
    err = _bad(path)
    assert err.stage == "probe" and "too small" in err.reason
    clip = decode_image(path, _spec("preprocess.min_source_side=1"))
    assert clip.frames.shape == (1, 32, 32, 3) and np.all(clip.frames == 9)


@pytest.mark.parametrize("decoder", [pytest.param("auto", marks=needs_decord), "pyav"])
@pytest.mark.parametrize("name", [H264, ROT90, MICROSCOPE])
def test_decoder_side_scaling_matches_full_size_resize(media, monkeypatch, decoder, name):
    """Frames shrunk by libswscale while decoding ≈ full-size frames resized by PIL (the reference)."""
    spec = _spec(f"preprocess.decoder={decoder}", "data.fps=30", "data.height=24", "data.width=40")
    scaled = decode_video(media(name), spec)
    monkeypatch.setattr(decode_mod, "cover_size", lambda h, w, size: None)  # full size + resize_crop
    reference = decode_video(media(name), spec)
    expected = "decord" if decoder == "auto" else "pyav"
    assert [c.start_s for c in scaled] == [c.start_s for c in reference]
    for a, b in zip(scaled, reference, strict=True):
        assert a.decoder == b.decoder == expected and a.source_size == b.source_size
        assert a.frames.shape == b.frames.shape == (a.frames.shape[0], 24, 40, 3)
        assert np.abs(a.frames.astype(np.float32) - b.frames).mean() < 3.0


@needs_decord
def test_decord_scaled_width_bug_falls_back_to_full_size(media):
    """decord 0.6 fails to copy out 48-px-wide frames: 640x424 → 32x32 covers at 48x32."""
    spec = _spec("data.fps=30")
    assert cover_size(424, 640, (spec.height, spec.width)) == (32, 48)
    clips = decode_video(media(MICROSCOPE), spec)
    assert clips and all(c.decoder == "decord" and c.frames.shape[1:] == (32, 32, 3) for c in clips)
