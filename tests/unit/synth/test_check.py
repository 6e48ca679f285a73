"""Reading synthetic clips back: every rendered item is described as its caption says; wrong captions,
scattered pieces and empty frames are caught."""

from __future__ import annotations

import numpy as np
import pytest

from stages.synth import (
    BACKGROUND,
    COLORS,
    describe,
    judge,
    largest_blob,
    parse_caption,
    plan_items,
    render_video,
)


@pytest.mark.parametrize("size", [64, 32])
def test_every_rendered_item_matches_its_caption(size):
    for item in plan_items(96, size, seed=3, image_fraction=0.25):
        clip = render_video(item, 8, size)
        if item["direction"] is None:
            clip = clip[:1]
        verdict = judge(clip, str(item["caption"]))
        assert all(verdict.values()), (item["caption"], describe(clip))
        assert ("direction" in verdict) == (item["direction"] is not None)


def test_wrong_caption_fails_only_the_wrong_attributes():
    item = next(
        i
        for i in plan_items(48, 32, seed=0, image_fraction=0.0)
        if i["caption"] == "a red circle moving right"
    )
    clip = render_video(item, 8, 32)
    assert judge(clip, "a blue circle moving right") == {"color": False, "shape": True, "direction": True}
    assert judge(clip, "a red square moving left") == {"color": True, "shape": False, "direction": False}
    assert judge(clip, "a red circle") == {"color": True, "shape": True}


def test_reversed_clip_reads_the_opposite_direction():
    for item in plan_items(48, 32, seed=1, image_fraction=0.0):
        clip = render_video(item, 8, 32)[::-1]
        opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[item["direction"]]
        assert describe(clip).direction == opposite


def test_scattered_pieces_have_no_shape_or_motion():
    rng = np.random.default_rng(0)
    clip = np.empty((8, 32, 32, 3), np.uint8)
    clip[:] = BACKGROUND
    for t in range(8):  # six separate 3×3 red specks per frame, none dominant
        for y, x in rng.integers(0, 29, size=(6, 2)) // 4 * 4:
            clip[t, y : y + 3, x : x + 3] = COLORS["red"]
    seen = describe(clip)
    assert seen.color == "red" and seen.shape is None and seen.direction is None
    assert judge(clip, "a red square moving right") == {"color": True, "shape": False, "direction": False}


def test_empty_clip_tells_nothing():
    clip = np.empty((4, 16, 16, 3), np.uint8)
    clip[:] = BACKGROUND
    assert describe(clip).caption() == "a ? ?"


def test_largest_blob_uses_4_connectivity():
    mask = np.zeros((5, 5), bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: two blobs of one pixel
    mask[3:5, 2:5] = True
    blob = largest_blob(mask)
    assert blob.sum() == 6 and not blob[0, 0] and not blob[1, 1]


@pytest.mark.parametrize(
    "caption", ["a purple circle", "a red hexagon moving up", "a red circle moving sideways", "hi"]
)
def test_parse_caption_rejects_other_text(caption):
    with pytest.raises(ValueError, match="caption"):
        parse_caption(caption)
