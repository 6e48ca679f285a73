"""Finding the inputs of a preprocessing job and their captions.

An INPUT is a folder (searched recursively), a glob, a CSV or JSONL manifest (`path`, `caption`), a
webdataset tar of raw videos in video2dataset's layout (`key.mp4` + `key.txt`/`key.json`), or a single
media file. Every input found becomes one `InputItem`; one whose caption or file is already known to be
bad carries an `error` so it is accounted as failed, never silently dropped.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from stages.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

MANIFEST_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class InputItem:
    """One input file: a path on disk, or a member of a raw-video tar (`member` set)."""

    path: str
    kind: str  # "video" | "image"
    caption: str = ""
    member: str = ""  # member name inside the tar at `path`
    error: str = ""  # discovery-time failure (missing file, unreadable caption)

    @property
    def id(self) -> str:
        """Stable identity of the input: the path, plus the member for tar-packed videos."""
        return f"{self.path}::{self.member}" if self.member else self.path

    @property
    def key(self) -> str:
        """16 hex digits identifying the input; sample keys are `{key}_{clip:04d}`."""
        return hashlib.sha1(self.id.encode()).hexdigest()[:16]


def media_kind(name: str) -> str:
    """'video', 'image' or '' from a file name's extension."""
    suffix = Path(name).suffix.lower().lstrip(".")
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    return ""


def _caption_from_bytes(data: bytes, source: str, is_json: bool) -> tuple[str, str]:
    """(caption, error) from a .txt or .json caption's bytes."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        return "", f"caption {source} is not valid UTF-8 ({err.reason} at byte {err.start})"
    if not is_json:
        return text.strip(), ""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return "", f"caption {source} is not valid JSON ({err.msg})"
    caption = obj.get("caption", obj.get("text", "")) if isinstance(obj, dict) else ""
    if not isinstance(caption, str):
        return "", f"caption {source}: 'caption' must be a string"
    return caption.strip(), ""


def _sidecar_caption(path: Path) -> tuple[str, str]:
    for suffix, is_json in ((".txt", False), (".json", True)):
        sidecar = path.with_suffix(suffix)
        if sidecar.is_file():
            return _caption_from_bytes(sidecar.read_bytes(), str(sidecar), is_json)
    return "", ""


def _file_item(path: Path, caption: str | None = None) -> InputItem:
    kind = media_kind(path.name) or "video"
    resolved = str(path.resolve())
    if not path.is_file():
        return InputItem(resolved, kind, caption or "", error=f"file not found: {path}")
    if caption is not None:
        return InputItem(resolved, kind, caption)
    text, error = _sidecar_caption(path)
    return InputItem(resolved, kind, text, error=error)


def _from_manifest(path: Path) -> list[InputItem]:
    base = path.parent
    rows: list[tuple[str, str]] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or "path" not in reader.fieldnames:
                raise ValueError(f"{path}: a CSV manifest needs a 'path' column (and optionally 'caption')")
            rows = [(row["path"], row.get("caption") or "") for row in reader]
    else:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("path"), str):
                raise ValueError(f"{path}:{number}: expected an object with a 'path' string")
            rows.append((obj["path"], str(obj.get("caption", ""))))
    items = []
    for rel, caption in rows:
        file = Path(rel) if Path(rel).is_absolute() else base / rel
        items.append(_file_item(file, caption))
    return items


def _from_tar(path: Path) -> list[InputItem]:
    """Raw videos/images in a webdataset tar: `key.ext` media plus `key.txt` / `key.json` captions."""
    media: dict[str, str] = {}
    captions: dict[str, tuple[str, str]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, _, suffix = member.name.partition(".")
            if media_kind(member.name):
                media[stem] = member.name
            elif suffix in ("txt", "json") and stem not in captions:
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                captions[stem] = _caption_from_bytes(data, f"{path}::{member.name}", suffix == "json")
    resolved = str(path.resolve())
    items = []
    for stem, name in media.items():
        caption, error = captions.get(stem, ("", ""))
        items.append(InputItem(resolved, media_kind(name), caption, member=name, error=error))
    return items


def _expand(spec: str) -> list[InputItem]:
    path = Path(spec)
    if any(ch in spec for ch in "*?["):
        matches = [Path(p) for p in glob.glob(spec, recursive=True)]
        return [_file_item(p) for p in matches if p.is_file() and media_kind(p.name)]
    if path.is_dir():
        return [_file_item(p) for p in path.rglob("*") if p.is_file() and media_kind(p.name)]
    if not path.exists():
        raise FileNotFoundError(
            f"input not found: {spec} (expected a folder, glob, manifest, tar or media file)"
        )
    suffix = path.suffix.lower()
    if suffix in MANIFEST_SUFFIXES:
        return _from_manifest(path)
    if suffix == ".tar":
        return _from_tar(path)
    if media_kind(path.name):
        return [_file_item(path)]
    raise ValueError(
        f"input {spec}: unknown kind; expected a folder, glob, .csv/.jsonl manifest, .tar shard or media file"
    )


def discover(inputs: list[str]) -> list[InputItem]:
    """Every input item under `inputs`, deduplicated and sorted by id (a stable order for sharding)."""
    if not inputs:
        raise ValueError("no inputs given")
    items: dict[str, InputItem] = {}
    for spec in inputs:
        for item in _expand(spec):
            items.setdefault(item.id, item)
    return sorted(items.values(), key=lambda item: item.id)


def count_by_kind(items: list[InputItem]) -> dict[str, int]:
    """Counts for `--dry-run`: videos, images, tar members and inputs already known to fail."""
    counts = Counter(item.kind for item in items)
    counts["in tar shards"] = sum(1 for item in items if item.member)
    counts["known bad"] = sum(1 for item in items if item.error)
    return {"total": len(items), **counts}
