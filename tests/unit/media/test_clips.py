"""Clip geometry without decoding: timestamp resampling (VFR), scene cuts, clip plans, resize/crop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from configs import load_config
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


def _spec(**changes) -> ClipSpec:
    base = ClipSpec(
        frames=4,
        fps=8.0,
        stride=0,
        max_clips=0,
        scene_cut_threshold=40.0,
        resize="crop",
        height=32,
        width=32,
    )
    return dataclasses.replace(base, **changes)


def _on_screen(ts: np.ndarray, t: float) -> int:
    """Brute force: the last frame whose timestamp is <= t."""
    return max(i for i in range(len(ts)) if ts[i] <= t + 1e-9)


# ---------------------------------------------------------------------------------------------------
# Spec
# ---------------------------------------------------------------------------------------------------


def test_spec_from_config():
    cfg = load_config(
        overrides=[
            "data.frames=4",
            "data.fps=6",
            "model.patch_size=[2,2,2]",
            "preprocess.stride=3",
            "preprocess.resize=bucket",
            "preprocess.buckets=[[32,16],[16,32]]",
            "preprocess.decoder=pyav",
        ]
    )
    spec = ClipSpec.from_config(cfg)
    assert (spec.frames, spec.fps, spec.stride, spec.step, spec.frame_multiple) == (4, 6.0, 3, 3, 2)
    assert spec.buckets == ((32, 16), (16, 32)) and spec.resize == "bucket" and spec.decoder == "pyav"
    assert spec.max_clips == cfg.preprocess.max_clips_per_video
    assert _spec().step == 4  # stride 0 → back-to-back clips
    hash(spec)  # frozen and hashable: safe to ship to worker processes


# ---------------------------------------------------------------------------------------------------
# Resampling by timestamps
# ---------------------------------------------------------------------------------------------------


def test_resample_constant_rate_downsamples_evenly():
    ts = np.arange(100) / 25.0  # 4 s at 25 fps
    idx, times = resample_indices(ts, 5.0)
    np.testing.assert_allclose(times, np.arange(20) / 5.0)
    np.testing.assert_array_equal(idx, np.arange(20) * 5)


def test_resample_upsampling_repeats_frames_and_covers_the_last_frame():
    ts = np.arange(3) / 10.0  # three frames of 0.1 s each: the video lasts 0.3 s
    idx, times = resample_indices(ts, 20.0)
    np.testing.assert_array_equal(idx, [0, 0, 1, 1, 2, 2])
    np.testing.assert_allclose(times, np.arange(6) / 20.0)


def test_resample_variable_frame_rate_picks_the_frame_on_screen():
    rng = np.random.default_rng(0)
    intervals = rng.choice([1 / 30, 1 / 15, 0.2, 0.01], size=80)
    ts = 0.5 + np.concatenate([[0.0], np.cumsum(intervals[:-1])])  # VFR with a non-zero start
    fps = 12.0
    idx, times = resample_indices(ts, fps)
    np.testing.assert_allclose(np.diff(times), 1 / fps)  # evenly timed output
    assert times[0] == ts[0]
    end = ts[-1] + np.median(np.diff(ts))
    assert times[-1] < end <= times[-1] + 1 / fps + 1e-9  # runs to the end of the last frame
    for i, t in zip(idx, times):
        assert i == _on_screen(ts, t)
        assert ts[i] <= t + 1e-9 and (i == len(ts) - 1 or t < ts[i + 1])
    # frame-count based sampling would be wrong here: index spacing is not constant
    assert len(set(np.diff(idx).tolist())) > 1


def test_resample_edge_cases():
    idx, times = resample_indices(np.array([]), 8.0)
    assert idx.size == 0 and times.size == 0
    idx, times = resample_indices(np.array([1.25]), 8.0)  # one frame → one output frame
    assert idx.tolist() == [0] and times.tolist() == [1.25]
    # an explicit start; target times before the first frame show the first frame
    idx, times = resample_indices(np.arange(10) / 10.0, 10.0, start=0.45)
    assert times[0] == 0.45 and idx[:2].tolist() == [4, 5]
    # float32 timestamps a hair above the target still count as on screen
    ts = (np.arange(50) / 25.0).astype(np.float32) + np.float32(1e-6)
    idx, _ = resample_indices(ts, 5.0)
    np.testing.assert_array_equal(idx, np.arange(10) * 5)
    with pytest.raises(ValueError):
        resample_indices(np.arange(3.0), 0.0)


# ---------------------------------------------------------------------------------------------------
# Scene cuts
# ---------------------------------------------------------------------------------------------------


def test_scene_cuts_hard_cut_yes_slow_fade_no():
    dark = np.full((32, 32), 20.0, dtype=np.float32)
    bright = np.full((32, 32), 220.0, dtype=np.float32)
    hard = np.stack([dark] * 5 + [bright] * 5)
    assert scene_cuts(hard, 40.0) == [5]
    fade = np.stack([np.full((32, 32), v, dtype=np.float32) for v in np.linspace(20, 220, 30)])
    assert scene_cuts(fade, 40.0) == []
    assert scene_cuts(hard, 0.0) == []  # 0 disables
    assert scene_cuts(hard[:1], 40.0) == []


def test_grey_thumbnails_are_area_averages():
    frame = np.zeros((90, 160, 3), dtype=np.uint8)
    frame[:, 80:] = 255
    (thumb,) = grey_thumbnails(frame[None])
    assert thumb.shape == (32, 32) and thumb.dtype == np.float32
    assert thumb[:, :16].max() == 0 and thumb[:, 16:].min() == pytest.approx(255, abs=1e-3)
    (tiny,) = grey_thumbnails(np.full((1, 2, 2, 3), 100, dtype=np.uint8))  # upsampling works too
    assert tiny.shape == (32, 32) and np.allclose(tiny, 100)


@pytest.mark.parametrize("shape", [(64, 96), (45, 70), (32, 32), (20, 50)])
def test_grey_thumbnails_are_exact_area_averages(shape):
    """Reference: repeat every pixel 32×32 times, then average blocks of h × w (exact overlap areas)."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    got = grey_thumbnails(frames)
    h, w = shape
    for frame, thumb in zip(frames, got, strict=True):
        grey = frame.astype(np.float64) @ [0.299, 0.587, 0.114]
        fine = np.repeat(np.repeat(grey, 32, axis=0), 32, axis=1)
        ref = fine.reshape(32, h, 32, w).mean(axis=(1, 3))
        np.testing.assert_allclose(thumb, ref, atol=1e-2)
    if shape == (64, 96):  # integer ratios: PIL's box filter agrees (up to its integer rounding)
        pil = Image.fromarray(frames[0]).convert("L").resize((32, 32), Image.Resampling.BOX)
        assert np.abs(got[0] - np.asarray(pil, dtype=np.float32)).max() < 1.5


# ---------------------------------------------------------------------------------------------------
# Clip plans
# ---------------------------------------------------------------------------------------------------


def test_plan_stride_and_cap():
    assert plan_clips(10, [], _spec()) == [(0, 4), (4, 8)]
    assert plan_clips(10, [], _spec(stride=2)) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert plan_clips(10, [], _spec(stride=2, max_clips=3)) == [(0, 4), (2, 6), (4, 8)]
    assert plan_clips(20, [], _spec(stride=7)) == [(0, 4), (7, 11), (14, 18)]


def test_plan_never_spans_a_cut():
    cuts = [3, 9]
    plan = plan_clips(16, cuts, _spec(stride=1))
    assert plan and all(not (a < c < b) for a, b in plan for c in cuts)
    assert (3, 7) in plan and (9, 13) in plan  # clips restart right after a cut
    assert plan_clips(16, cuts, _spec()) == [(3, 7), (9, 13)]
    # every segment shorter than a clip (but the video is long enough) → nothing to take
    assert plan_clips(8, [2, 5], _spec()) == []


def test_plan_short_video_rule_and_frame_multiple():
    assert plan_clips(3, [], _spec(frames=8)) == [(0, 3)]  # one shorter clip, never padded
    assert plan_clips(1, [], _spec(frames=8)) == [(0, 1)]  # a 1-frame video
    assert plan_clips(7, [], _spec(frames=8, frame_multiple=2)) == [(0, 6)]  # trimmed to pt
    assert plan_clips(7, [5], _spec(frames=8, frame_multiple=2)) == [(0, 4)]  # first segment only
    assert plan_clips(1, [], _spec(frames=8, frame_multiple=2)) == []  # not even one multiple
    assert plan_clips(0, [], _spec()) == []
    assert all((b - a) % 2 == 0 for a, b in plan_clips(30, [7], _spec(frames=4, frame_multiple=2)))


def test_frames_to_decode_bounds_the_work():
    assert frames_to_decode(1000, _spec(max_clips=2)) == 2 * 4 + 4
    assert frames_to_decode(1000, _spec(max_clips=2, stride=10)) == 2 * 10 + 4
    assert frames_to_decode(5, _spec(max_clips=2)) == 5
    assert frames_to_decode(1000, _spec(max_clips=0)) == 1000


# ---------------------------------------------------------------------------------------------------
# Space
# ---------------------------------------------------------------------------------------------------


def test_target_size_crop_and_nearest_bucket():
    assert target_size(1080, 1920, _spec(height=48, width=64)) == (48, 64)
    buckets = ((32, 32), (32, 64), (64, 32), (16, 64))
    spec = _spec(resize="bucket", buckets=buckets)
    assert target_size(1080, 1920, spec) == (32, 64)  # 0.5625 is nearest to 1:2
    assert target_size(1920, 1080, spec) == (64, 32)  # portrait
    assert target_size(500, 510, spec) == (32, 32)
    assert target_size(100, 1000, spec) == (16, 64)  # very wide → widest bucket
    # exact tie in log space (1:1 between 1:2 and 2:1) → the first listed bucket
    assert target_size(50, 50, _spec(resize="bucket", buckets=((32, 64), (64, 32)))) == (32, 64)
    assert target_size(50, 50, _spec(resize="bucket", buckets=((64, 32), (32, 64)))) == (64, 32)


@pytest.mark.parametrize("shape", [(480, 640), (640, 480), (17, 23), (32, 32)])
def test_resize_crop_output_size(shape):
    frame = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    for size in [(32, 32), (16, 48), (48, 16)]:
        out = resize_crop(frame, size)
        assert out.shape == (*size, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("shape", [(10000, 16), (16, 10000)])
def test_resize_crop_extreme_aspect(shape):
    frame = np.zeros((*shape, 3), dtype=np.uint8)
    frame[..., 0] = 200
    out = resize_crop(frame, (32, 32))
    assert out.shape == (32, 32, 3) and np.all(out[..., 0] == 200) and np.all(out[..., 1] == 0)


def test_resize_crop_upscales_tiny_input():
    frame = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    out = resize_crop(frame, (32, 32))
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])  # corners keep their source colours
    np.testing.assert_array_equal(out[-1, -1], [255, 255, 255])
    np.testing.assert_array_equal(out[0, -1], [0, 255, 0])


def test_resize_crop_keeps_the_centre():
    h, w = 120, 360  # wide: the crop drops the left and right thirds
    frame = np.zeros((h, w, 3), dtype=np.uint8)
    frame[:, : w // 3] = (255, 0, 0)
    frame[:, 2 * w // 3 :] = (0, 0, 255)
    frame[h // 2 - 10 : h // 2 + 10, w // 2 - 10 : w // 2 + 10] = (0, 255, 0)  # marked centre
    out = resize_crop(frame, (40, 40)).astype(int)
    assert out[..., 0].max() < 40 and out[..., 2].max() < 40  # no side bands left
    green = np.argwhere(out[..., 1] > 128)
    np.testing.assert_allclose(green.mean(axis=0), [19.5, 19.5], atol=0.6)
    assert len(green) == pytest.approx((20 * 40 / 120) ** 2, rel=0.3)  # scaled by 1/3
    np.testing.assert_array_equal(resize_crop(frame[:40, :40], (40, 40)), frame[:40, :40])  # identity


@pytest.mark.parametrize(
    ("h", "w", "size", "expected"),
    [
        ((1080, 1920, (32, 32), (32, 56))),  # 56.9: the nearest width of even margin
        ((1080, 1920, (31, 32), (31, 56))),  # 55.1
        ((568, 320, (24, 40), (70, 40))),  # 71.0 is odd against 24 rows: 70
        ((568, 320, (32, 16), (32, 18))),
        ((424, 640, (32, 32), (32, 48))),
        ((100, 101, (32, 32), (32, 32))),  # within a pixel of the target: no margin at all
        ((64, 64, (64, 64), None)),  # same size: nothing to shrink
        ((16, 10000, (32, 32), None)),  # would need enlarging: resize_crop instead
    ],
)
def test_cover_size(h, w, size, expected):
    got = cover_size(h, w, size)
    assert got == expected
    if got is not None:
        assert got[0] >= size[0] and got[1] >= size[1]
        assert all(abs(g - s * max(size[0] / h, size[1] / w)) <= 1.0 for g, s in zip(got, (h, w)))
        assert (got[0] - size[0]) % 2 == 0 and (got[1] - size[1]) % 2 == 0


def test_center_crop_takes_the_middle():
    frame = np.arange(6 * 9 * 3, dtype=np.uint8).reshape(6, 9, 3)
    np.testing.assert_array_equal(center_crop(frame, (4, 5)), frame[1:5, 2:7])
    with pytest.raises(ValueError, match="cannot crop 6x9 to 7x9"):
        center_crop(frame, (7, 9))
