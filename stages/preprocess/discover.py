"""Finding the inputs of a preprocessing job and their captions.

An INPUT is a folder (searched recursively, symlinked folders followed), a glob (`*`, `?`, `[...]` match
within one name, `**` any number of folders; names starting with '.' only match a pattern that does), a
CSV or JSONL manifest (`stages.preprocess.manifests`), a webdataset tar of raw videos in video2dataset's
layout (`stages.preprocess.tar_inputs`; a glob's `.tar` matches are read as such), or a single media
file; a file's caption is its `.txt`, else `.json`, sidecar. Every input found becomes one `InputItem`;
one already known to be bad - a missing file, an unreadable caption, a folder that cannot be read or
that leads back to one of its own parents (a symlink loop), a manifest line that does not fit, a tar
member that is not read - carries an `error` so it is accounted as failed, never silently dropped.
Inputs holding no video or image at all are refused.
"""

from __future__ import annotations

import fnmatch
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from stages.preprocess.items import OTHER, InputItem, file_item, media_kind
from stages.preprocess.manifests import from_manifest
from stages.preprocess.tar_inputs import from_tar

MANIFEST_SUFFIXES = (".csv", ".jsonl")
GLOB_CHARACTERS = "*?["

Found = Path | InputItem
"""What a folder search yields: a file, or a failure item for a folder it could not search."""


def is_glob(spec: str) -> bool:
    """Whether `spec` is a glob pattern."""
    return any(ch in spec for ch in GLOB_CHARACTERS)


# --------------------------------------------------------------------------------------------------
# Searching folders
# --------------------------------------------------------------------------------------------------


def _folder_identity(path: str) -> tuple[int, int]:
    stat = os.stat(path)  # follows symlinks: the folder itself
    return stat.st_dev, stat.st_ino


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _folder_failure(path: str, reason: str) -> InputItem:
    return InputItem(os.path.abspath(path), OTHER, error=reason)


def _walk(
    folder: str, ancestors: dict[tuple[int, int], str], walked: set, depth: int | None
) -> Iterator[Found]:
    """Files under `folder`, descending at most `depth` more levels (None: all). A subfolder that is one
    of `ancestors` (a symlink loop) or cannot be read is a failure item; one already searched under
    another name is skipped, its files being found once."""
    try:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
    except OSError as err:
        yield _folder_failure(folder, f"cannot read folder {folder} ({err.strerror})")
        return
    for entry in entries:
        if not _is_folder(entry):
            yield Path(entry.path)
            continue
        if depth == 0:
            continue
        identity = _folder_identity(entry.path)
        if identity in ancestors:
            reason = f"folder {entry.path} leads back to {ancestors[identity]} (a symlink loop); not searched"
            yield _folder_failure(entry.path, reason)
        elif identity not in walked:
            walked.add(identity)
            inner = None if depth is None else depth - 1
            yield from _walk(entry.path, {**ancestors, identity: entry.path}, walked, inner)


def _search(folder: str, depth: int | None = None) -> Iterator[Found]:
    """Every file under `folder` (see `_walk`), each folder searched once however it is reached."""
    identity = _folder_identity(folder)
    yield from _walk(folder, {identity: folder}, {identity}, depth)


# --------------------------------------------------------------------------------------------------
# Globs
# --------------------------------------------------------------------------------------------------


def _name_matches(name: str, pattern: str) -> bool:
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)


def _matches(parts: list[str], pattern: list[str]) -> bool:
    """Whether a relative path's names match the pattern's, `**` standing for any number of folders."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(
            _matches(parts[skip:], rest)
            for skip in range(len(parts) + 1)
            if not any(name.startswith(".") for name in parts[:skip])
        )
    return bool(parts) and _name_matches(parts[0], head) and _matches(parts[1:], rest)


def _glob(spec: str) -> Iterator[Found]:
    """Files matching the glob `spec`, and failure items for folders that could not be searched; found
    with `_search` (symlink loops end the search), so a recursive glob always terminates."""
    parts = spec.split("/")
    fixed = next(i for i, part in enumerate(parts) if is_glob(part))
    base = "/".join(parts[:fixed]) or ("/" if spec.startswith("/") else ".")
    pattern = [part for part in parts[fixed:] if part]
    if not os.path.isdir(base):
        return
    depth = None if "**" in pattern else len(pattern) - 1
    for found in _search(base, depth):
        if isinstance(found, InputItem) or _matches(os.path.relpath(found, base).split("/"), pattern):
            yield found


def is_input(spec: str) -> bool:
    """Whether `spec` names something on disk: a path that exists, or a glob that matches a file."""
    return os.path.lexists(spec) or (is_glob(spec) and any(isinstance(f, Path) for f in _glob(spec)))


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def _items(found: Iterator[Found], read_tars: bool = False) -> list[InputItem]:
    """Failure items as they are, an item for each media file and, with `read_tars`, the items of each
    `.tar`; other files are not inputs."""
    items: list[InputItem] = []
    for f in found:
        if isinstance(f, InputItem):
            items.append(f)
        elif media_kind(f.name):
            items.append(file_item(f))
        elif read_tars and f.suffix.lower() == ".tar" and f.is_file():
            items.extend(from_tar(f))
    return items


def _expand(spec: str) -> list[InputItem]:
    path = Path(spec)
    if is_glob(spec):
        return _items(_glob(spec), read_tars=True)
    if path.is_dir():
        return _items(_search(spec))
    if not path.exists():
        raise FileNotFoundError(
            f"input not found: {spec} (expected a folder, glob, manifest, tar or media file)"
        )
    suffix = path.suffix.lower()
    if suffix in MANIFEST_SUFFIXES:
        return from_manifest(path)
    if suffix == ".tar":
        return from_tar(path)
    if media_kind(path.name):
        return [file_item(path)]
    raise ValueError(
        f"input {spec}: unknown kind; expected a folder, glob, .csv/.jsonl manifest, .tar shard or media file"
    )


def discover(inputs: list[str]) -> list[InputItem]:
    """Every input item under `inputs`, deduplicated and sorted by id (a stable order for sharding);
    a ValueError when there is none."""
    if not inputs:
        raise ValueError("no inputs given")
    items: dict[str, InputItem] = {}
    for spec in inputs:
        for item in _expand(spec):
            items.setdefault(item.id, item)
    if not items:
        raise ValueError(
            f"no videos or images found in INPUTS ({', '.join(inputs)}): "
            "expected media files such as .mp4 or .jpg in the folders, globs, manifests or tars"
        )
    return sorted(items.values(), key=lambda item: item.id)


def count_by_kind(items: list[InputItem]) -> dict[str, int]:
    """Counts for `--dry-run`: videos, images, tar members and inputs already known to fail."""
    counts = Counter(item.kind for item in items)
    counts["in tar shards"] = sum(1 for item in items if item.member)
    counts["known bad"] = sum(1 for item in items if item.error)
    return {"total": len(items), **counts}
