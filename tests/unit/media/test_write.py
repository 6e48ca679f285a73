"""Media output: mp4 round trip (frames, size, rate, pixels), byte determinism, odd sizes, atomic writes,
input errors that name the file; contact-sheet geometry and cell contents."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from stages.media import contact_sheet, frame_indices, write_mp4


def _clip(frames: int = 8, height: int = 32, width: int = 48) -> np.ndarray:
    """A smooth colour gradient with a grey square moving right: easy for H.264, still not constant."""
    y, x = np.mgrid[0:height, 0:width]
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        video[t, ..., 0] = 40 + 150 * x / width
        video[t, ..., 1] = 40 + 150 * y / height
        video[t, ..., 2] = 100 + 10 * t
        left = 2 + 3 * t
        video[t, 8:20, left : left + 12] = 128
    return video


def _decode(path: Path) -> tuple[np.ndarray, Fraction]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, stream.average_rate


# ---------------------------------------------------------------------------------------------------------
# write_mp4
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fps", [8.0, 29.97])
def test_round_trip_keeps_count_size_rate_and_pixels(tmp_path, fps):
    video = _clip()
    path = tmp_path / "clip.mp4"
    write_mp4(video, path, fps)
    decoded, rate = _decode(path)
    assert decoded.shape == video.shape
    assert rate == Fraction(fps).limit_denominator(1001)
    error = np.abs(decoded.astype(int) - video.astype(int))
    assert error.mean() < 6, error.mean()
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no .partial left behind


def test_identical_input_gives_identical_bytes_and_crf_matters(tmp_path):
    video = _clip()
    write_mp4(video, tmp_path / "a.mp4", 8.0)
    write_mp4(video.copy(), tmp_path / "b.mp4", 8.0)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    write_mp4(video, tmp_path / "c.mp4", 8.0, crf=40)
    assert (tmp_path / "c.mp4").stat().st_size < (tmp_path / "a.mp4").stat().st_size


def test_single_frame_and_missing_parent_directory(tmp_path):
    path = tmp_path / "new" / "dir" / "still.mp4"
    write_mp4(_clip(frames=1), path, 24.0)
    decoded, _ = _decode(path)
    assert decoded.shape == (1, 32, 48, 3)


@pytest.mark.parametrize(("height", "width"), [(31, 48), (32, 47), (17, 23)])
def test_odd_sizes_are_padded_by_repeating_the_edge(tmp_path, height, width):
    video = _clip(height=height, width=width)
    path = tmp_path / "odd.mp4"
    write_mp4(video, path, 8.0)
    decoded, _ = _decode(path)
    assert decoded.shape == (8, height + height % 2, width + width % 2, 3)
    error = np.abs(decoded[:, :height, :width].astype(int) - video.astype(int))
    assert error.mean() < 6
    # the added row / column repeats the last one of the input
    if height % 2:
        assert np.abs(decoded[:, -1, :width].astype(int) - video[:, -1].astype(int)).mean() < 6
    if width % 2:
        assert np.abs(decoded[:, :height, -1].astype(int) - video[:, :, -1].astype(int)).mean() < 6


@pytest.mark.parametrize(
    ("frames", "fps", "match"),
    [
        (_clip().astype(np.float32), 8.0, "uint8"),
        (_clip()[0], 8.0, r"\(T, H, W, 3\)"),
        (np.zeros((2, 8, 8, 4), np.uint8), 8.0, r"\(T, H, W, 3\)"),
        (np.zeros((0, 8, 8, 3), np.uint8), 8.0, "at least one frame"),
        ([[0]], 8.0, "numpy array"),
        (_clip(), 0.0, "fps"),
        (_clip(), float("inf"), "fps"),
    ],
)
def test_bad_input_errors_name_the_file(tmp_path, frames, fps, match):
    path = tmp_path / "bad.mp4"
    with pytest.raises(ValueError, match=match) as info:
        write_mp4(frames, path, fps)
    assert str(path) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_crf(tmp_path):
    with pytest.raises(ValueError, match="crf"):
        write_mp4(_clip(), tmp_path / "x.mp4", 8.0, crf=60)


# ---------------------------------------------------------------------------------------------------------
# contact_sheet
# ---------------------------------------------------------------------------------------------------------


def test_frame_indices_are_even_and_include_both_ends():
    assert frame_indices(5, 16).tolist() == [0, 1, 2, 3, 4]
    assert frame_indices(9, 3).tolist() == [0, 4, 8]
    assert frame_indices(1, 4).tolist() == [0]
    assert frame_indices(7, 1).tolist() == [0]
    many = frame_indices(100, 16)
    assert len(many) == 16 and many[0] == 0 and many[-1] == 99 and (np.diff(many) > 0).all()


def test_sheet_geometry_gaps_and_cells(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (10, 16, 24, 3), dtype=np.uint8)  # 10 frames → 4 shown, same height
    b = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)  # half height → scaled up to 16×16
    gap = 3
    sheet = contact_sheet([a, b], tmp_path / "sheet.png", max_frames=4, gap=gap)

    width_a = 4 * 24 + 3 * gap
    assert sheet.shape == (gap + 2 * (16 + gap), gap + width_a + gap, 3)
    with Image.open(tmp_path / "sheet.png") as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), sheet)

    # row 0: frames 0, 3, 6, 9 of a, unscaled, with white gaps between and around them
    for k, i in enumerate([0, 3, 6, 9]):
        x = gap + k * (24 + gap)
        assert np.array_equal(sheet[gap : gap + 16, x : x + 24], a[i])
        assert (sheet[: gap + 16, x - gap : x] == 255).all()  # gap column left of each cell
    # row 1: all three frames of b, each resized to 16×16 as PIL would
    y = gap + 16 + gap
    for k in range(3):
        x = gap + k * (16 + gap)
        expected = np.asarray(Image.fromarray(b[k]).resize((16, 16), Image.Resampling.BICUBIC))
        assert np.array_equal(sheet[y : y + 16, x : x + 16], expected)
        assert (sheet[y : y + 16, x - gap : x] == 255).all()
    assert (sheet[y:, gap + 3 * 16 + 2 * gap :] == 255).all()  # shorter row: white to the right
    for row_top in (0, gap + 16):
        assert (sheet[row_top : row_top + gap] == 255).all()  # gap rows above each row
    assert (sheet[-gap:] == 255).all() and (sheet[:, -gap:] == 255).all()


def test_labels_add_a_left_column(tmp_path):
    video = np.zeros((2, 16, 16, 3), dtype=np.uint8)  # black cells
    plain = contact_sheet([video, video], tmp_path / "plain.png", gap=2)
    labelled = contact_sheet([video, video], tmp_path / "labelled.png", labels=["base", "ssr 4x"], gap=2)
    extra = labelled.shape[1] - plain.shape[1]
    assert labelled.shape[0] == plain.shape[0] and extra > 10
    assert np.array_equal(labelled[:, extra:], plain)  # cells shift right, unchanged
    label_area = labelled[:, :extra]
    assert (label_area < 128).any() and (label_area == 255).mean() > 0.5  # dark text on white


def test_sheet_errors(tmp_path):
    video = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="non-empty"):
        contact_sheet([], tmp_path / "s.png")
    with pytest.raises(ValueError, match="labels"):
        contact_sheet([video], tmp_path / "s.png", labels=["a", "b"])
    with pytest.raises(ValueError, match="row 1"):
        contact_sheet([video, video.astype(np.int16)], tmp_path / "s.png")
    assert list(tmp_path.iterdir()) == []
