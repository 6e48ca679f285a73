"""What discovery finds: `InputItem`s (one per input file or tar member), their media kind and captions.

An item that is already known to be bad carries an `error` in plain words (what and where); the job
accounts it as a failed input in failures.jsonl and the manifest, so nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from stages.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

OTHER = "other"
"""The kind of a failure item that is no video or image (a folder, a manifest line, a stray tar member)."""


@dataclass(frozen=True)
class InputItem:
    """One input file: a path on disk, or a member of a raw-video tar (`member` set)."""

    path: str
    kind: str  # "video" | "image" | OTHER
    caption: str = ""
    member: str = ""  # member name inside the tar at `path`
    error: str = ""  # discovery-time failure (missing file, unreadable caption, bad manifest line, ...)

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


def caption_from_bytes(data: bytes, source: str, is_json: bool) -> tuple[str, str]:
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
    """(caption, error) from `path`'s `.txt` sidecar, else its `.json` one; ("", "") when it has none."""
    for suffix, is_json in ((".txt", False), (".json", True)):
        sidecar = path.with_suffix(suffix)
        if not sidecar.exists() and not sidecar.is_symlink():
            continue
        if not sidecar.is_file():  # a folder, a FIFO (reading would block) or a broken link
            return "", f"caption {sidecar} is not a regular file"
        try:
            data = sidecar.read_bytes()
        except OSError as err:
            return "", f"cannot read caption {sidecar} ({err.strerror})"
        return caption_from_bytes(data, str(sidecar), is_json)
    return "", ""


def file_item(path: Path, caption: str | None = None) -> InputItem:
    """The item of a media file on disk; `caption` given (a manifest's) or read from its sidecar."""
    kind = media_kind(path.name) or "video"
    resolved = str(path.resolve())
    if not path.is_file():
        link = f" (a broken symlink to {path.readlink()})" if path.is_symlink() else ""
        return InputItem(resolved, kind, caption or "", error=f"file not found: {path}{link}")
    if caption is not None:
        return InputItem(resolved, kind, caption)
    text, error = _sidecar_caption(path)
    return InputItem(resolved, kind, text, error=error)
