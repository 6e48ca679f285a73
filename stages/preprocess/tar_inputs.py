"""Raw videos and images in a webdataset tar (video2dataset's layout): `key.mp4` + `key.txt`/`key.json`.

Members group by webdataset's key rule: the key is the member's folder part plus its basename up to the
basename's first dot; the rest is the field (`set.v1/0001.mp4` → key `set.v1/0001`, field `mp4`;
`clip.a.mp4` → key `clip`, field `a.mp4`). Every media member is its own item, so no two ever merge.
A media field `NAME.EXT` takes its caption from the field-matched `NAME.txt` / `NAME.json` when there is
one, else from the key's `txt` / `json` (so `clip.a.mp4` and `clip.b.mp4` share `clip.txt`, while
`clip.b.txt`, when present, wins for `clip.b.mp4`); `txt` is read before `json`. A member that is not
read - a link, a device or FIFO, a name without an extension or with an unknown one, a caption that
belongs to no media member - is a failure item naming the tar, the member and why. A tar that cannot
be opened, or that breaks off (truncated, corrupt), is one failure item naming the tar and where it
broke; the members read before the break are still items.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from stages.preprocess.items import OTHER, InputItem, caption_from_bytes, media_kind

CAPTION_FIELDS = ("txt", "json")  # in the order they are preferred

Captions = dict[tuple[str, str], dict[str, tuple[str, bytes]]]
"""(key, field stem) → {"txt" | "json": (member name, bytes)}."""


def split_key(name: str) -> tuple[str, str] | None:
    """(key, field) of a member name by webdataset's rule, the field lower-cased; None without a dot
    in the basename (or with nothing before it)."""
    folder = name[: name.rfind("/") + 1]
    stem, dot, field = name[len(folder) :].partition(".")
    if not stem or not dot:
        return None
    return folder + stem, field.lower()


def _not_a_file(member: tarfile.TarInfo) -> str:
    """Why a non-folder member is not read, or '' for a regular file."""
    if member.issym():
        return f"a symlink (to {member.linkname}), not a file; links inside a tar are not followed"
    if member.islnk():
        return f"a hard link (to {member.linkname}), not a file; links inside a tar are not followed"
    if member.isfifo():
        return "a FIFO, not a file"
    if member.ischr() or member.isblk():
        return "a device, not a file"
    return "" if member.isreg() else f"not a regular file (tar member type {member.type!r})"


def _caption(captions: Captions, key: str, stem: str, where: str) -> tuple[str, str]:
    """(caption, error) of media field `stem.*` of `key`: its own caption, else the key's."""
    for candidate in (stem, ""):
        fields = captions.get((key, candidate))
        if fields:
            ext = next(ext for ext in CAPTION_FIELDS if ext in fields)
            name, data = fields[ext]
            return caption_from_bytes(data, f"{where}::{name}", ext == "json")
    return "", ""


def _check_end(tar: tarfile.TarFile) -> None:
    """Raise when the archive stops without the two zero blocks that end a tar: tarfile reads a tar cut
    at a member boundary as complete, and the members after the cut would be lost without a word."""
    tar.fileobj.seek(tar.offset)  # type: ignore[union-attr]
    end = tar.fileobj.read(2 * tarfile.BLOCKSIZE)  # type: ignore[union-attr]
    if len(end) < 2 * tarfile.BLOCKSIZE or any(end):
        raise tarfile.ReadError("it ends without the end-of-archive blocks: truncated")


def from_tar(path: Path) -> list[InputItem]:
    """One item per media member of the tar at `path`, and one failure item per member not read."""
    where = str(path.resolve())
    media: dict[str, list[tuple[str, str]]] = {}  # key → [(member name, field stem)]
    captions: Captions = {}
    failures: list[InputItem] = []

    def fail(name: str, reason: str) -> None:
        failures.append(
            InputItem(where, media_kind(name) or OTHER, member=name, error=f"{where}::{name}: {reason}")
        )

    def take(tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        reason, split = _not_a_file(member), split_key(member.name)
        if reason or split is None:
            fail(member.name, reason or "no extension (expected KEY.mp4, KEY.jpg, KEY.txt, KEY.json, ...)")
            return
        key, field = split
        stem, _, ext = field.rpartition(".")
        if media_kind(member.name):
            media.setdefault(key, []).append((member.name, stem))
        elif ext in CAPTION_FIELDS:
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            captions.setdefault((key, stem), {})[ext] = (member.name, data)
        else:
            fail(member.name, f"unknown extension '.{ext}' (not a video, image or .txt/.json caption)")

    done = 0  # members read in full
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isdir():
                    take(tar, member)
                done += 1
            _check_end(tar)
    except (OSError, EOFError, tarfile.TarError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err) or type(err).__name__
        kept = f"the {done} member(s) before it are kept" if done else "no member could be read"
        failures.append(InputItem(where, OTHER, error=f"{where}: cannot read the tar ({reason}); {kept}"))

    items = []
    for key, members in media.items():
        for name, stem in members:
            caption, error = _caption(captions, key, stem, where)
            items.append(InputItem(where, media_kind(name), caption, member=name, error=error))
    used = {(key, stem) for key, members in media.items() for _, stem in members} | {(k, "") for k in media}
    for (key, stem), fields in captions.items():
        if (key, stem) not in used:
            owner = f"{key}.{stem}.*" if stem else f"{key}.*"
            for name, _ in fields.values():
                fail(name, f"a caption that belongs to no video or image (no media member {owner})")
    return items + failures
