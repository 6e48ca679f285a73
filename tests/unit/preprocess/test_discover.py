"""Input discovery: folders, globs, manifests, raw-video tars, captions, and inputs that are already bad."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from stages.preprocess import count_by_kind, discover


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_recursive_with_sidecar_captions(tmp_path):
    _touch(tmp_path / "a" / "clip.MP4")
    (tmp_path / "a" / "clip.txt").write_text("  a dog runs \n")
    _touch(tmp_path / "a" / "b" / "photo.jpg")
    (tmp_path / "a" / "b" / "photo.json").write_text(json.dumps({"caption": "a cat"}))
    _touch(tmp_path / "notes.md")
    _touch(tmp_path / "movie.webm")
    items = discover([str(tmp_path)])
    by_name = {Path(i.path).name: i for i in items}
    assert set(by_name) == {"clip.MP4", "photo.jpg", "movie.webm"}
    assert by_name["clip.MP4"].caption == "a dog runs" and by_name["clip.MP4"].kind == "video"
    assert by_name["photo.jpg"].caption == "a cat" and by_name["photo.jpg"].kind == "image"
    assert by_name["movie.webm"].caption == ""
    assert [i.id for i in items] == sorted(i.id for i in items)
    assert discover([str(tmp_path), str(tmp_path / "a")]) == items  # duplicates collapse


def test_glob_and_single_file(tmp_path):
    _touch(tmp_path / "x" / "1.mov")
    _touch(tmp_path / "y" / "2.png")
    items = discover([str(tmp_path / "**" / "*.mov"), str(tmp_path / "y" / "2.png")])
    assert sorted(Path(i.path).name for i in items) == ["1.mov", "2.png"]


def test_csv_and_jsonl_manifests(tmp_path):
    _touch(tmp_path / "media" / "a.mp4")
    (tmp_path / "m.csv").write_text('path,caption\nmedia/a.mp4,"a, quoted caption"\nmedia/missing.mp4,gone\n')
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"path": str(tmp_path / "media" / "a.mp4"), "caption": "x"}) + "\n"
    )
    items = discover([str(tmp_path / "m.csv")])
    assert [i.caption for i in items] == ["a, quoted caption", "gone"]
    assert items[0].error == "" and "file not found" in items[1].error
    assert discover([str(tmp_path / "m.jsonl")])[0].caption == "x"
    (tmp_path / "bad.csv").write_text("file,caption\nx,y\n")
    with pytest.raises(ValueError, match="'path' column"):
        discover([str(tmp_path / "bad.csv")])
    (tmp_path / "bad.jsonl").write_text('{"path": "a"}\nnot json\n')
    errors = {Path(i.path).name: i.error for i in discover([str(tmp_path / "bad.jsonl")])}
    assert errors == {  # a line that is not JSON is a failure of that line; the rest goes on
        "a": f"file not found: {tmp_path / 'a'}",
        "bad.jsonl:2": f"{tmp_path / 'bad.jsonl'}:2: not valid JSON (Expecting value)",
    }


def test_video2dataset_tar(tmp_path):
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [
            ("000.mp4", b"video"),
            ("000.txt", b"a caption"),
            ("001.mp4", b"video"),
            ("001.json", json.dumps({"caption": "from json"}).encode()),
            ("002.mp4", b"video"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    items = discover([str(shard)])
    assert [(i.member, i.caption) for i in items] == [
        ("000.mp4", "a caption"),
        ("001.mp4", "from json"),
        ("002.mp4", ""),
    ]
    assert len({i.key for i in items}) == 3 and all(len(i.key) == 16 for i in items)
    assert count_by_kind(items)["in tar shards"] == 3


def test_bad_captions_and_inputs(tmp_path):
    _touch(tmp_path / "v.mp4")
    (tmp_path / "v.txt").write_bytes(b"caf\xe9 \xff")
    items = discover([str(tmp_path)])
    assert "not valid UTF-8" in items[0].error and str(tmp_path / "v.txt") in items[0].error
    assert count_by_kind(items)["known bad"] == 1
    with pytest.raises(FileNotFoundError, match="input not found"):
        discover([str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="unknown kind"):
        discover([str(_touch(tmp_path / "readme.md"))])
    with pytest.raises(ValueError, match="no inputs"):
        discover([])
