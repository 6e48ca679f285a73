"""A hanging or crashing decoder costs one file, never the job; decode processes are recycled."""

from __future__ import annotations

import time

import numpy as np
from PIL import Image

from stages.media.clips import ClipSpec
from stages.preprocess import DecodeFailure, DecodeProcess, InputItem
from tests.integration.decode_faults import misbehaving_decode

SPEC = ClipSpec(
    frames=1, fps=1.0, stride=0, max_clips=1, scene_cut_threshold=0.0, resize="crop", height=8, width=8
)


def _image(tmp_path, name="ok.png") -> InputItem:
    path = tmp_path / name
    Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8)).save(path)
    return InputItem(str(path), "image")


def _failure(decoder: DecodeProcess, item: InputItem) -> DecodeFailure:
    try:
        decoder.decode(item)
    except DecodeFailure as err:
        return err
    raise AssertionError(f"{item.path} decoded although it should fail")


def test_hang_is_killed_after_the_timeout_and_work_goes_on(tmp_path):
    with DecodeProcess(SPEC, timeout_s=3.0, recycle_after=100, decode_fn=misbehaving_decode) as decoder:
        assert decoder.decode(_image(tmp_path))[0].frames.shape == (1, 8, 8, 3)
        start = time.monotonic()
        failure = _failure(decoder, InputItem(str(tmp_path / "hang.png"), "image"))
        assert failure.stage == "timeout" and "longer than 3s" in failure.reason
        assert time.monotonic() - start < 20
        assert decoder.decode(_image(tmp_path))[0].kind == "image"  # a fresh process took over


def test_native_crash_becomes_a_failure(tmp_path):
    with DecodeProcess(SPEC, timeout_s=30.0, recycle_after=100, decode_fn=misbehaving_decode) as decoder:
        failure = _failure(decoder, InputItem(str(tmp_path / "crash.png"), "image"))
        assert failure.stage == "crash" and "signal 6" in failure.reason
        assert decoder.decode(_image(tmp_path))[0].kind == "image"


def test_processes_are_recycled_and_python_errors_stay_per_file(tmp_path):
    pids = []
    with DecodeProcess(SPEC, timeout_s=30.0, recycle_after=2, decode_fn=misbehaving_decode) as decoder:
        for _ in range(4):
            failure = _failure(decoder, InputItem(str(tmp_path / "pid.png"), "image"))
            assert failure.stage == "decode" and failure.reason.startswith("ValueError: pid=")
            pids.append(failure.reason.split("=")[1])
        missing = _failure(
            decoder, InputItem(str(tmp_path / "gone.png"), "image", error="file not found: gone.png")
        )
        assert missing.stage == "discover"
    assert pids[0] == pids[1] != pids[2] == pids[3]


def test_imap_keeps_order_and_requeues_what_a_killed_child_held(tmp_path):
    """With the next item already queued in the child, a hang or crash costs only its own file."""
    ok = [_image(tmp_path, f"ok{i}.png") for i in range(4)]
    items = [
        ok[0],
        InputItem(str(tmp_path / "hang.png"), "image"),
        ok[1],  # queued in the child that gets killed for the hang
        InputItem(str(tmp_path / "gone.png"), "image", error="file not found: gone.png"),
        InputItem(str(tmp_path / "crash.png"), "image"),
        ok[2],
        InputItem(str(tmp_path / "pid.png"), "image"),
        ok[3],
    ]
    with DecodeProcess(SPEC, timeout_s=3.0, recycle_after=3, decode_fn=misbehaving_decode) as decoder:
        results = list(decoder.imap(items))
    assert [item for item, _ in results] == items
    outcome = [r.stage if isinstance(r, DecodeFailure) else r[0].kind for _, r in results]
    assert outcome == ["image", "timeout", "image", "discover", "crash", "image", "decode", "image"]
