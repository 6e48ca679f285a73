"""Synthetic dataset: byte-determinism per seed, decodable H.264 with the captioned colour and motion,
exact PNG stills, full attribute coverage, and argument errors that name the argument."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from configs import SynthConfig
from stages.synth.make import (
    BACKGROUND,
    COLORS,
    DIRECTIONS,
    IMAGE_COMBOS,
    SHAPES,
    VIDEO_COMBOS,
    SynthSummary,
    run_synth,
    shape_mask,
)

SIZE, FRAMES, FPS = 32, 8, 8.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, SynthSummary]:
    out = tmp_path_factory.mktemp("synth")
    return out, run_synth(
        out, SynthConfig(count=16, frames=FRAMES, size=SIZE, fps=FPS, seed=3), progress=False
    )


def _manifest(out: Path) -> dict:
    return json.loads((out / "synth.json").read_text(encoding="utf-8"))


def _tree(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _decode(path: Path) -> tuple[list[np.ndarray], Fraction, dict]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream.average_rate, dict(container.metadata)


def _foreground(frame: np.ndarray) -> np.ndarray:
    """Pixels clearly away from the background grey (survives H.264 ringing at the shape's edge)."""
    return np.abs(frame.astype(int) - np.array(BACKGROUND)).sum(-1) > 90


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    """Keep pixels whose (2r+1)² neighbourhood is all inside the mask: the shape interior, away from
    the edge where 4:2:0 chroma subsampling blends colour with the background."""
    h, w = mask.shape
    padded = np.pad(mask, r)
    out = np.ones_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out &= padded[dy : dy + h, dx : dx + w]
    return out


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


# ---------------------------------------------------------------------------------------------------------
# Layout, captions, manifest
# ---------------------------------------------------------------------------------------------------------


def test_layout_counts_and_captions(dataset):
    out, summary = dataset
    assert (summary.videos, summary.images) == (12, 4)  # round(16 · 0.25) images
    assert summary.out == out
    names = [p.name for p in summary.files]
    assert names == [f"video_{i:05d}.mp4" for i in range(12)] + [f"image_{i:05d}.png" for i in range(4)]
    items = _manifest(out)["items"]
    assert [it["file"] for it in items] == names
    for path, item in zip(summary.files, items):
        raw = path.with_suffix(".txt").read_bytes()
        caption = raw.decode("utf-8")
        assert caption == item["caption"] and "\n" not in caption
        if item["direction"] is None:
            assert caption == f"a {item['color']} {item['shape']}"
        else:
            assert caption == f"a {item['color']} {item['shape']} moving {item['direction']}"
    params = _manifest(out)["params"]
    assert (params["count"], params["frames"], params["size"], params["fps"], params["seed"]) == (
        16,
        FRAMES,
        SIZE,
        FPS,
        3,
    )
    assert "16" in summary.table() and "videos" in summary.table()


# ---------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, dataset):
    out, _ = dataset
    again = _tree(
        run_synth(
            tmp_path / "a", SynthConfig(16, frames=FRAMES, size=SIZE, fps=FPS, seed=3), progress=False
        ).out
    )
    assert again == _tree(out)

    other = _tree(
        run_synth(
            tmp_path / "b", SynthConfig(16, frames=FRAMES, size=SIZE, fps=FPS, seed=4), progress=False
        ).out
    )
    assert other.keys() == again.keys()
    media = [name for name in again if name.endswith((".mp4", ".png"))]
    differing = [name for name in media if other[name] != again[name]]
    assert len(differing) >= len(media) // 2
    assert other["synth.json"] != again["synth.json"]


def test_no_creation_time_or_version_metadata(dataset):
    _, summary = dataset
    _, _, metadata = _decode(summary.files[0])
    assert "creation_time" not in metadata and "encoder" not in metadata


# ---------------------------------------------------------------------------------------------------------
# Videos decode back with the captioned colour and motion
# ---------------------------------------------------------------------------------------------------------


def test_videos_decode_with_caption_colour_and_direction(dataset):
    out, summary = dataset
    items = [it for it in _manifest(out)["items"] if it["direction"] is not None]
    assert len(items) == summary.videos
    for item in items:
        frames, rate, _ = _decode(out / item["file"])
        assert len(frames) == FRAMES
        assert rate == Fraction(FPS)
        assert all(f.shape == (SIZE, SIZE, 3) for f in frames)

        target = np.array(COLORS[item["color"]])
        (x0, y0), (x1, y1), side = item["start"], item["end"], item["side"]
        for t, frame in enumerate(frames):
            # where the manifest says the shape is: linear from start to end, rounded to whole pixels
            a = t / (FRAMES - 1)
            x, y = round(x0 + (x1 - x0) * a), round(y0 + (y1 - y0) * a)
            placed = np.zeros((SIZE, SIZE), dtype=bool)
            placed[y : y + side, x : x + side] = shape_mask(item["shape"], side)
            fg = _foreground(frame)
            # the decoded shape is there: its interior is foreground, and nothing outside its 1-px rim is
            assert fg[_erode(placed, 1)].all() and not fg[_erode(~placed, 1)].any(), (item, t)

            # interior one pixel in from the edge, where 4:2:0 chroma no longer mixes in the background
            mean = frame[_erode(placed, 1)].astype(float).mean(0)
            assert np.abs(mean - target).max() < 15, (item, t, mean)
            nearest = min(COLORS, key=lambda c: np.abs(mean - np.array(COLORS[c])).sum())
            assert nearest == item["color"]

            # the rest stays the plain grey (a little ringing next to the edge is allowed)
            error = np.abs(frame[_erode(~placed, 2)].astype(int) - np.array(BACKGROUND))
            assert error.mean() < 2 and error.max() < 24, (item, t)

        move = _centroid(_foreground(frames[-1])) - _centroid(_foreground(frames[0]))
        axis, sign = {"right": (0, 1), "left": (0, -1), "down": (1, 1), "up": (1, -1)}[item["direction"]]
        assert sign * move[axis] >= SIZE / 3, (item, move)
        assert abs(move[1 - axis]) <= 1.0, (item, move)


@pytest.mark.parametrize("fps", [7.5, 24.0])
def test_other_frame_rates_and_sizes(tmp_path, fps):
    summary = run_synth(tmp_path, SynthConfig(count=1, frames=3, size=16, fps=fps, seed=0), progress=False)
    frames, rate, _ = _decode(summary.files[0])
    assert rate == Fraction(fps) and len(frames) == 3 and frames[0].shape == (16, 16, 3)
    assert _foreground(frames[0]).any()


# ---------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------


def test_images_are_exact_pngs_with_colour_only_captions(dataset):
    out, _ = dataset
    items = [it for it in _manifest(out)["items"] if it["direction"] is None]
    assert len(items) == 4
    for item in items:
        with Image.open(out / item["file"]) as im:
            assert im.format == "PNG" and im.size == (SIZE, SIZE) and im.mode == "RGB"
            pixels = np.asarray(im)
        caption = (out / item["file"]).with_suffix(".txt").read_text(encoding="utf-8")
        assert re.fullmatch(r"a (red|green|blue|yellow) (circle|square|triangle)", caption)
        colours = {tuple(c) for c in pixels.reshape(-1, 3).tolist()}
        assert colours == {BACKGROUND, COLORS[item["color"]]}  # exact fills, no anti-aliasing
        painted = np.all(pixels == COLORS[item["color"]], axis=-1)
        x, y = item["start"]
        side = item["side"]
        expected = np.zeros((SIZE, SIZE), dtype=bool)
        expected[y : y + side, x : x + side] = shape_mask(item["shape"], side)
        assert np.array_equal(painted, expected)


def test_shape_masks():
    side = 21
    square, circle, triangle = (shape_mask(s, side) for s in ("square", "circle", "triangle"))
    assert square.all()
    assert abs(circle.sum() - np.pi * (side / 2) ** 2) < 2 * side
    assert abs(triangle.sum() - side**2 / 2) < side
    for mask in (circle, triangle):
        assert np.array_equal(mask, mask[:, ::-1])  # left-right symmetric
    assert triangle[-1].all() and triangle[0].sum() <= 1  # base at the bottom, apex at the top
    # all three are distinguishable by area
    assert len({int(square.sum()), int(circle.sum()), int(triangle.sum())}) == 3
    with pytest.raises(ValueError, match="shape"):
        shape_mask("hexagon", side)


# ---------------------------------------------------------------------------------------------------------
# Coverage and fractions
# ---------------------------------------------------------------------------------------------------------


def test_every_combination_present(tmp_path):
    assert len(VIDEO_COMBOS) == len(SHAPES) * len(COLORS) * len(DIRECTIONS) == 48
    summary = run_synth(tmp_path, SynthConfig(count=64, frames=2, size=16, seed=11), progress=False)
    assert (summary.videos, summary.images) == (48, 16)
    items = _manifest(tmp_path)["items"]
    videos = {(it["color"], it["shape"], it["direction"]) for it in items if it["direction"]}
    images = {(it["color"], it["shape"]) for it in items if it["direction"] is None}
    assert videos == set(VIDEO_COMBOS)
    assert images == set(IMAGE_COMBOS)


@pytest.mark.parametrize(("fraction", "videos", "images"), [(0.0, 3, 0), (1.0, 0, 3), (0.5, 1, 2)])
def test_image_fraction(tmp_path, fraction, videos, images):
    summary = run_synth(
        tmp_path, SynthConfig(count=3, frames=2, size=16, image_fraction=fraction), progress=False
    )
    assert (summary.videos, summary.images) == (videos, images)
    assert len(summary.files) == 3 and all(p.exists() for p in summary.files)


def _cross_positions(items: list[dict]) -> tuple[set[int], set[int]]:
    """Video cross-axis coordinates and still-image coordinates of the manifest's items."""
    video, image = set(), set()
    for it in items:
        (x0, y0), (x1, y1) = it["start"], it["end"]
        if it["direction"] is None:
            image |= {x0, y0}
        else:
            assert (y0 == y1) if it["direction"] in ("left", "right") else (x0 == x1)
            video.add(y0 if it["direction"] in ("left", "right") else x0)
    return video, image


def test_position_jitter_zero_pins_shapes_to_the_centre_line(tmp_path):
    run_synth(tmp_path, SynthConfig(count=64, frames=2, size=32, seed=3, position_jitter=0.0), progress=False)
    side = _manifest(tmp_path)["items"][0]["side"]
    video, image = _cross_positions(_manifest(tmp_path)["items"])
    centre = {(32 - side) // 2, (32 - side + 1) // 2}  # the centred top-left (either, when not integral)
    assert len(video) == 1 and video <= centre
    assert image == video
    # the moving axis still crosses the frame: the first frame's shape is far from the last frame's
    for it in _manifest(tmp_path)["items"]:
        if it["direction"]:
            assert max(abs(a - b) for a, b in zip(it["start"], it["end"])) >= 32 - side - 2


def test_position_jitter_narrows_the_spread_around_the_centre(tmp_path):
    spreads = {}
    for jitter in (1.0, 0.3):
        run_synth(
            tmp_path / str(jitter),
            SynthConfig(count=96, frames=2, size=64, seed=5, position_jitter=jitter),
            progress=False,
        )
        items = _manifest(tmp_path / str(jitter))["items"]
        video, image = _cross_positions(items)
        side, margin = items[0]["side"], 2
        free = 64 - side - 2 * margin  # range of a fully-inside top-left at jitter 1
        centre = margin + free / 2
        spreads[jitter] = max(abs(p - centre) for p in video | image)
        assert spreads[jitter] <= jitter * free / 2 + 0.5
    assert spreads[0.3] < spreads[1.0] / 2


def test_shape_size_sets_the_box_and_the_painted_pixels(tmp_path):
    run_synth(
        tmp_path,
        SynthConfig(count=8, frames=2, size=32, seed=1, image_fraction=0.5, shape_size=0.5),
        progress=False,
    )
    items = _manifest(tmp_path)["items"]
    assert {it["side"] for it in items} == {16}
    assert _manifest(tmp_path)["params"]["shape_size"] == 0.5
    for it in items:
        if it["direction"] is None:  # a lossless PNG: the painted pixels are exactly the mask
            frame = np.asarray(Image.open(tmp_path / it["file"]).convert("RGB"))
            painted = (frame != np.array(BACKGROUND, np.uint8)).any(axis=-1)
            assert painted.sum() == shape_mask(it["shape"], 16).sum()
            ys, xs = np.nonzero(painted)
            assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 == 16


def test_rerun_with_fewer_items_removes_stale_files(tmp_path):
    run_synth(tmp_path, SynthConfig(count=8, frames=2, size=16), progress=False)
    (tmp_path / "notes.md").write_text("mine")
    summary = run_synth(tmp_path, SynthConfig(count=4, frames=2, size=16), progress=False)
    expected = {p.name for p in summary.files} | {p.with_suffix(".txt").name for p in summary.files}
    assert {p.name for p in tmp_path.iterdir()} == expected | {"synth.json", "notes.md"}


def test_rerun_removes_what_a_killed_write_left(tmp_path):
    torn = tmp_path / "video_00000.mp4.tmp-4242-4243"
    torn.write_bytes(b"half an mp4")
    run_synth(tmp_path, SynthConfig(count=2, frames=2, size=16), progress=False)
    assert not torn.exists() and not list(tmp_path.glob("*.tmp-*"))


# ---------------------------------------------------------------------------------------------------------
# Argument errors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name", "expected"),
    [
        ({"count": 0}, "count", "got 0, expected an integer >= 1"),
        ({"count": 2.5}, "count", "got 2.5, expected an integer >= 1"),
        ({"size": 8}, "size", "got 8, expected an integer >= 16"),
        ({"size": 33}, "size", "got 33, expected an even size"),
        ({"frames": 1}, "frames", "got 1, expected an integer >= 2"),
        ({"fps": 0.0}, "fps", "got 0.0, expected > 0"),
        ({"fps": float("nan")}, "fps", "got nan, expected a finite number > 0"),
        ({"seed": -1}, "seed", "got -1, expected an integer >= 0"),
        ({"image_fraction": 1.5}, "image_fraction", "got 1.5, expected a value in [0, 1]"),
        ({"position_jitter": -0.1}, "position_jitter", "got -0.1, expected a value in [0, 1]"),
        ({"position_jitter": "0"}, "position_jitter", "got '0', expected a finite number in [0, 1]"),
        ({"shape_size": 0.0}, "shape_size", "got 0.0, expected a value in (0, 0.75]"),
        ({"shape_size": 0.8}, "shape_size", "got 0.8, expected a value in (0, 0.75]"),
    ],
)
def test_argument_errors_name_the_argument(tmp_path, kwargs, name, expected):
    args = {"count": 2, **kwargs}
    with pytest.raises(ValueError, match=rf"^{name}\b") as err:
        run_synth(tmp_path / "out", SynthConfig(**args), progress=False)
    assert str(err.value).startswith(f"{name}: {expected}")
    assert not (tmp_path / "out").exists()


def test_out_must_be_a_directory(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="out"):
        run_synth(target, SynthConfig(count=1), progress=False)
