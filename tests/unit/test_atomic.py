"""Atomic files: a target is replaced whole or not at all, a failed write leaves nothing behind, and the
cleanup removes exactly the temporary files a killed writer leaves."""

from __future__ import annotations

import os

import pytest

from stages.atomic import LEFTOVER, NoSpaceLeft, atomic_path, remove_leftovers, write_bytes, write_text


def test_write_replaces_the_target_through_a_sibling_temporary_file(tmp_path):
    target = tmp_path / "sub" / "record.json"
    write_text(target, "old")
    seen = []
    with atomic_path(target) as tmp:
        seen.append(tmp)
        assert tmp.parent == target.parent and LEFTOVER.fullmatch(tmp.name)
        tmp.write_text("new")
        assert target.read_text() == "old"  # readers see the old file until the rename
    assert target.read_text() == "new" and not seen[0].exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["record.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "shard.tar"
    write_bytes(target, b"complete")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["shard.tar"]


def test_remove_leftovers_deletes_only_temporary_files(tmp_path):
    (tmp_path / "parts").mkdir()
    leftovers = [
        tmp_path / "parts" / f"train-000001.json.tmp-{os.getpid()}-77",
        tmp_path / "train-000004.tar.tmp-29342",  # the name earlier versions wrote
    ]
    keep = [tmp_path / "train-000004.tar", tmp_path / "notes.tmp-draft", tmp_path / "a.tmp-12-x"]
    for path in leftovers + keep:
        path.write_text("x")
    (tmp_path / "dir.tmp-5-6").mkdir()  # a folder, not a torn file
    assert remove_leftovers(tmp_path) == 2
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in keep) and (tmp_path / "dir.tmp-5-6").is_dir()


def test_a_write_that_fills_the_disk_says_so_whatever_the_writer_reported(small_disk):
    import torch

    target = small_disk / "big.bin"
    with pytest.raises(NoSpaceLeft, match=rf"^no space left on device writing {target} \(0\.0 MB free\)$"):
        write_bytes(target, b"x" * (2 << 20))  # Python's own OSError(ENOSPC)
    state = small_disk / "state.pt"
    with pytest.raises(NoSpaceLeft, match=f"writing {state}"), atomic_path(state) as tmp:
        torch.save({"w": torch.zeros(1 << 19)}, tmp)  # torch says only "unexpected pos"
    assert list(small_disk.iterdir()) == []  # no temporary file left behind


def test_other_write_errors_pass_unchanged(tmp_path):
    with pytest.raises(ZeroDivisionError), atomic_path(tmp_path / "a"):
        raise ZeroDivisionError
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(IsADirectoryError):
        write_bytes(folder, b"x")
