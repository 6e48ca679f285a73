"""Discovery never loses an input without a word: tar keys with dots, strict manifests, unreadable and
looping folders, globs over symlink loops, inputs named like overrides, and a job with nothing to do."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.cli import main
from stages.preprocess import discover
from tests import ROOT

NOBODY = 65534


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return path


def _special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _by_id(items) -> dict[str, tuple[str, str]]:
    return {item.id: (item.caption, item.error) for item in items}


# --------------------------------------------------------------------------------------------------
# Raw-video tars
# --------------------------------------------------------------------------------------------------


def test_tar_keys_follow_webdataset_dots_in_folders_and_keys_never_merge(tmp_path):
    shard = _tar(
        tmp_path / "raw.tar",
        [
            ("set.v1/0001.mp4", b"v"),
            ("set.v1/0001.txt", b"first"),
            ("set.v1/0002.mp4", b"v"),
            ("set.v1/0002.json", json.dumps({"caption": "second"}).encode()),
            ("clip.a.mp4", b"v"),
            ("clip.b.mp4", b"v"),
            ("clip.txt", b"the key's caption"),
            ("clip.b.txt", b"b's own caption"),
        ],
    )
    items = discover([str(shard)])
    assert {item.member: (item.caption, item.error) for item in items} == {
        "set.v1/0001.mp4": ("first", ""),
        "set.v1/0002.mp4": ("second", ""),
        "clip.a.mp4": ("the key's caption", ""),  # shares the key's caption
        "clip.b.mp4": ("b's own caption", ""),  # a field-matched caption wins
    }
    assert len({item.key for item in items}) == 4


def test_tar_members_that_are_not_inputs_are_counted_failures(tmp_path):
    shard = _tar(
        tmp_path / "raw.tar",
        [
            ("ok.mp4", b"v"),
            ("orphan.txt", b"a caption with no video"),
            ("ok.extra.txt", b"a field caption with no such media field"),
            ("notes.md", b"?"),
            ("README", b"?"),
            _special("soft.mp4", tarfile.SYMTYPE, "ok.mp4"),
            _special("hard.mp4", tarfile.LNKTYPE, "ok.mp4"),
            _special("pipe.mp4", tarfile.FIFOTYPE),
            _special("dev.mp4", tarfile.CHRTYPE),
        ],
    )
    errors = {item.member: item.error for item in discover([str(shard)])}
    assert errors.pop("ok.mp4") == ""
    assert set(errors) == {
        "orphan.txt",
        "ok.extra.txt",
        "notes.md",
        "README",
        "soft.mp4",
        "hard.mp4",
        "pipe.mp4",
        "dev.mp4",
    }
    assert all(f"{shard.resolve()}::{member}" in error for member, error in errors.items())
    assert "no video or image" in errors["orphan.txt"] and "no video or image" in errors["ok.extra.txt"]
    assert "unknown extension" in errors["notes.md"] and "no extension" in errors["README"]
    assert "symlink" in errors["soft.mp4"] and "hard link" in errors["hard.mp4"]
    assert "FIFO" in errors["pipe.mp4"] and "device" in errors["dev.mp4"]


# --------------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cut", "reason"),
    [
        (2048 + 2, "unexpected end of data"),  # inside a.txt's data
        (1536, "it ends without the end-of-archive blocks: truncated"),  # right after a.mp4, between members
    ],
)
def test_a_truncated_tar_keeps_the_members_before_the_break_and_is_a_failure(tmp_path, cut, reason):
    whole = _tar(tmp_path / "whole.tar", [("a.mp4", b"v" * 600), ("a.txt", b"first"), ("b.mp4", b"w" * 600)])
    short = _touch(tmp_path / "cut.tar", whole.read_bytes()[:cut])  # a.mp4: 512-byte header + 1024 of data
    items = _by_id(discover([str(short)]))
    where = str(short.resolve())
    assert items.pop(f"{where}::a.mp4") == ("", "")  # its caption was past the break
    kept = "the 1 member(s) before it are kept"
    assert items == {where: ("", f"{where}: cannot read the tar ({reason}); {kept}")}


def test_a_tar_that_is_not_a_tar_or_cannot_be_read_is_one_failure_naming_it(open_tmp):
    garbage = _touch(open_tmp / "garbage.tar", b"not a tar at all" * 64)
    items = discover([str(garbage)])
    assert [i.id for i in items] == [str(garbage)]
    assert items[0].error.startswith(f"{garbage}: cannot read the tar (")
    assert items[0].error.endswith("; no member could be read")
    locked = _tar(open_tmp / "locked.tar", [("a.mp4", b"v")])
    locked.chmod(0)
    assert _discover_unprivileged([str(locked)]) == {
        str(locked): ("", f"{locked}: cannot read the tar (Permission denied); no member could be read")
    }


def test_csv_rows_that_do_not_fit_the_header_are_failures_naming_file_and_line(tmp_path):
    _touch(tmp_path / "a.mp4")
    _touch(tmp_path / "b.mp4")
    manifest = tmp_path / "m.csv"
    manifest.write_text('path,caption\na.mp4,a dog, running\nb.mp4\n"b.mp4","quoted, fine"\n,no path\n')
    items = discover([str(manifest)])
    good = [item for item in items if not item.error]
    assert [(Path(i.path).name, i.caption) for i in good] == [("b.mp4", "quoted, fine")]
    errors = sorted(item.error for item in items if item.error)
    where = str(manifest.resolve())
    assert errors == [
        f"{where}:2: 3 fields, the header has 2 (quote a caption that holds a comma)",
        f"{where}:3: 1 field, the header has 2",
        f"{where}:5: empty 'path'",
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"path": "a.mp4", "caption": 7}', "'caption' must be a string or null, got int"),
        ('{"path": 3}', "'path' must be a string, got int"),
        ('{"caption": "no path"}', "expected an object with a 'path' string"),
        ('["a.mp4"]', "expected an object with a 'path' string"),
        ("not json", "not valid JSON (Expecting value)"),
    ],
)
def test_jsonl_lines_that_do_not_fit_are_failures_and_the_rest_goes_on(tmp_path, line, expected):
    _touch(tmp_path / "a.mp4")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "a.mp4", "caption": "fine"}) + "\n" + line + "\n")
    items = discover([str(manifest)])
    assert [(i.caption, i.error) for i in items if not i.error] == [("fine", "")]
    assert [i.error for i in items if i.error] == [f"{manifest.resolve()}:2: {expected}"]


def test_jsonl_null_caption_is_no_caption_not_the_word_none(tmp_path):
    _touch(tmp_path / "a.mp4")
    (tmp_path / "m.jsonl").write_text('{"path": "a.mp4", "caption": null}\n')
    assert [(i.caption, i.error) for i in discover([str(tmp_path / "m.jsonl")])] == [("", "")]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_manifest_rows_that_are_not_utf8_are_failures_naming_file_and_line(tmp_path, suffix):
    _touch(tmp_path / "a.mp4")
    _touch(tmp_path / "b.mp4")
    rows = {
        ".csv": [b"path,caption", b"a.mp4,caf\xe9 latin-1", b"b.mp4,fine"],
        ".jsonl": [b'{"path": "a.mp4", "caption": "caf\xe9"}', b'{"path": "b.mp4", "caption": "fine"}'],
    }[suffix]
    manifest = _touch(tmp_path / f"m{suffix}", b"\n".join(rows) + b"\n")
    items = discover([str(manifest)])
    assert [(Path(i.path).name, i.caption) for i in items if not i.error] == [("b.mp4", "fine")]
    line = 2 if suffix == ".csv" else 1
    expected = f"{manifest.resolve()}:{line}: not valid UTF-8 (byte 0xe9)"
    assert [i.error for i in items if i.error] == [expected]


def test_a_csv_header_that_is_not_utf8_refuses_the_manifest_naming_it(tmp_path):
    manifest = _touch(tmp_path / "m.csv", b"p\xe4th,caption\na.mp4,x\n")
    with pytest.raises(ValueError, match=f"{manifest}: the CSV header is not valid UTF-8 \\(byte 0xe4\\)"):
        discover([str(manifest)])


def test_an_unreadable_manifest_is_one_failure_naming_it(open_tmp):
    manifest = _touch(open_tmp / "m.jsonl", b'{"path": "a.mp4"}\n')
    manifest.chmod(0)
    assert _discover_unprivileged([str(manifest)]) == {
        str(manifest): ("", f"{manifest}: cannot read the manifest (Permission denied)")
    }


def test_a_broken_media_symlink_is_a_failure_saying_so(tmp_path):
    (tmp_path / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")
    _touch(tmp_path / "ok.mp4")
    assert _by_id(discover([str(tmp_path)]))[str(tmp_path / "nowhere.mp4")] == (
        "",
        f"file not found: {tmp_path / 'gone.mp4'} (a broken symlink to {tmp_path / 'nowhere.mp4'})",
    )


# --------------------------------------------------------------------------------------------------
# Unreadable and odd paths
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary folder another user can enter (pytest's tmp_path is private to root)."""
    with tempfile.TemporaryDirectory(prefix="tessera-discover-") as name:
        os.chmod(name, 0o755)
        yield Path(name)


def _discover_in_child(specs: list[str], timeout_s: float = 60, user: int | None = None) -> dict:
    """discover(specs) in a fresh interpreter with a deadline, so a hang fails the test; with `user`, the
    child drops to that user once imported (the interpreter may live where that user cannot read).
    Returns {id: (caption, error)}."""
    drop = f"os.setgid({user}); os.setuid({user})\n" if user is not None else ""
    code = (
        "import json, os, sys\nfrom stages.preprocess import discover\n"
        f"{drop}print(json.dumps({{i.id: [i.caption, i.error] for i in discover(sys.argv[1:])}}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *specs],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    return {key: tuple(value) for key, value in json.loads(done.stdout).items()}


def _discover_unprivileged(specs: list[str]) -> dict:
    """discover as a user that file permissions apply to: this process, or `nobody` when it is root."""
    if os.geteuid() == 0:
        return _discover_in_child(specs, user=NOBODY)
    return _by_id(discover(specs))


def test_an_unreadable_caption_is_a_failure_of_its_item(open_tmp):
    _touch(open_tmp / "a.mp4")
    _touch(open_tmp / "b.mp4")
    (open_tmp / "b.txt").write_text("fine")
    caption = _touch(open_tmp / "a.txt", b"secret")
    caption.chmod(0)
    found = _discover_unprivileged([str(open_tmp)])
    assert found[str(open_tmp / "b.mp4")] == ("fine", "")
    assert found[str(open_tmp / "a.mp4")] == ("", f"cannot read caption {caption} (Permission denied)")


def test_a_caption_path_that_is_not_a_file_is_a_failure(tmp_path):
    _touch(tmp_path / "a.mp4")
    (tmp_path / "a.txt").mkdir()
    (item,) = discover([str(tmp_path)])
    assert item.error == f"caption {tmp_path / 'a.txt'} is not a regular file"


def test_an_unreadable_folder_is_a_failure_not_a_silent_gap(open_tmp):
    _touch(open_tmp / "ok.mp4")
    locked = open_tmp / "locked"
    _touch(locked / "hidden.mp4")
    locked.chmod(0)
    try:
        found = _discover_unprivileged([str(open_tmp)])
    finally:
        locked.chmod(0o755)
    assert found == {
        str(open_tmp / "ok.mp4"): ("", ""),
        str(locked): ("", f"cannot read folder {locked} (Permission denied)"),
    }


def test_symlinked_folders_are_followed_and_loops_are_failures(tmp_path):
    data = tmp_path / "elsewhere" / "dataset"
    _touch(data / "clip.mp4")
    root = tmp_path / "in"
    root.mkdir()
    (root / "dataset").symlink_to(data)
    (data / "again").symlink_to(data.parent)  # a loop: elsewhere/dataset/again → elsewhere
    found = _by_id(discover([str(root)]))
    loop = root / "dataset" / "again" / "dataset"
    assert found == {
        str(data / "clip.mp4"): ("", ""),
        str(loop): ("", f"folder {loop} leads back to {root / 'dataset'} (a symlink loop); not searched"),
    }


def test_a_recursive_glob_over_a_symlink_loop_terminates(tmp_path):
    _touch(tmp_path / "d" / "a" / "1.mp4")
    _touch(tmp_path / "d" / "a" / ".hidden" / "2.mp4")
    (tmp_path / "d" / "a" / "up").symlink_to(tmp_path / "d")
    (tmp_path / "d" / "a" / "side").symlink_to(tmp_path / "d" / "a")
    found = _discover_in_child([str(tmp_path / "d" / "**" / "*.mp4")], timeout_s=60)
    clips = {key for key, (_, error) in found.items() if not error}
    assert clips == {str(tmp_path / "d" / "a" / "1.mp4")}  # hidden folders stay out, as with glob
    loops = {key: error for key, (_, error) in found.items() if key not in clips}
    assert set(loops) == {str(tmp_path / "d" / "a" / "up"), str(tmp_path / "d" / "a" / "side")}
    assert all("symlink loop" in error for error in loops.values())


def test_a_glob_without_recursion_matches_one_level_per_part(tmp_path):
    _touch(tmp_path / "x" / "1.mp4")
    _touch(tmp_path / "x" / "deeper" / "2.mp4")
    _touch(tmp_path / "y" / "3.MP4")
    names = {Path(i.path).name for i in discover([str(tmp_path / "*" / "*.mp4")])}
    assert names == {"1.mp4"}


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def test_inputs_with_equals_signs_are_inputs_and_dotted_keys_are_overrides(tmp_path, capsys):
    _touch(tmp_path / "a=b" / "clip.mp4")
    _touch(tmp_path / "clip=1.mp4")
    argv = ["preprocess", str(tmp_path / "a=b"), str(tmp_path / "clip=1.mp4"), "--dry-run"]
    assert main([*argv, "preprocess.workers=3"]) == 0
    listed = capsys.readouterr().out
    assert str(tmp_path / "a=b" / "clip.mp4") in listed and str(tmp_path / "clip=1.mp4") in listed
    assert "# total: 2" in listed
    assert main([*argv, "preprocess.workers=zero"]) == 2  # still an override: a bad value is named
    assert "preprocess.workers" in capsys.readouterr().err
    assert main(["preprocess", str(tmp_path / "missing=1.mp4"), "--dry-run"]) == 2
    assert "input not found" in capsys.readouterr().err  # a path, not a dotted key: a missing input


def test_a_relative_glob_that_looks_like_an_override_but_matches_is_an_input(tmp_path, capsys, monkeypatch):
    _touch(tmp_path / "clip=1.mp4")
    monkeypatch.chdir(tmp_path)
    assert main(["preprocess", "clip=*.mp4", "--dry-run"]) == 0
    assert str(tmp_path / "clip=1.mp4") in capsys.readouterr().out


def test_zero_inputs_is_refused_in_one_line_also_on_dry_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _touch(tmp_path / "empty" / "notes.md")
    for extra in (["--dry-run"], ["--local", "--quiet"]):
        rc = main(["preprocess", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert rc == 2
        assert err.count("\n") == 1 and err.startswith("error: no videos or images found in INPUTS")
        assert str(tmp_path / "empty") in err


def test_a_glob_of_raw_video_tars_reads_the_tars(tmp_path):
    _tar(tmp_path / "raw" / "00000.tar", [("000.mp4", b"v"), ("000.txt", b"first")])
    _tar(tmp_path / "raw" / "00001.tar", [("000.mp4", b"v")])
    items = discover([str(tmp_path / "raw" / "*.tar")])  # as in the README: "/data/raw/*.tar"
    assert [(Path(i.path).name, i.member, i.caption) for i in items] == [
        ("00000.tar", "000.mp4", "first"),
        ("00001.tar", "000.mp4", ""),
    ]
