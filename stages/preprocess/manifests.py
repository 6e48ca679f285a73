"""CSV and JSONL manifests of inputs: one row per file, `path` (relative to the manifest's folder, or
absolute) and an optional `caption`, parsed strictly.

A CSV needs a `path` column (else the whole file is refused); a row with more or fewer fields than the
header (an unquoted comma in a caption) or an empty path is a failure item. A JSONL line must be an
object with a string `path` and a string `caption` (missing or null: no caption); any other line, or one
that is not JSON, is a failure item. So is a row or line that is not UTF-8. Failure items name the
manifest and line (`{file}:{line}: ...`) and the rest of the manifest goes on; a manifest that cannot be
read at all is one failure item naming it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from stages.preprocess.items import OTHER, InputItem, file_item

Row = tuple[int, str, str, str]
"""(line number, path, caption, error); an error row carries no path."""


def _fields(count: int) -> str:
    return f"{count} field" + ("" if count == 1 else "s")


def _not_utf8(text: str) -> str:
    """The error of text decoded with surrogateescape that held bytes which are not UTF-8, else ''."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"not valid UTF-8 (byte 0x{ord(text[err.start]) - 0xDC00:02x})"
    return ""


def _csv_rows(path: Path) -> Iterator[Row]:
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        if bad := _not_utf8(",".join(header)):
            raise ValueError(f"{path}: the CSV header is {bad}")
        if "path" not in header:
            raise ValueError(f"{path}: a CSV manifest needs a 'path' column (and optionally 'caption')")
        for row in reader:
            line = reader.line_num
            bad = _not_utf8(",".join(value for value in row.values() if isinstance(value, str)))
            extra, missing = len(row.get(None, [])), sum(value is None for value in row.values())
            if bad:
                yield line, "", "", bad
            elif extra:
                got = _fields(len(header) + extra)
                yield (
                    line,
                    "",
                    "",
                    f"{got}, the header has {len(header)} (quote a caption that holds a comma)",
                )
            elif missing:
                yield line, "", "", f"{_fields(len(header) - missing)}, the header has {len(header)}"
            elif not row["path"]:
                yield line, "", "", "empty 'path'"
            else:
                yield line, row["path"], row.get("caption") or "", ""


def _jsonl_row(line: int, text: str) -> Row:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return line, "", "", f"not valid JSON ({err.msg})"
    if not isinstance(obj, dict) or "path" not in obj:
        return line, "", "", "expected an object with a 'path' string"
    file, caption = obj["path"], obj.get("caption")
    if not isinstance(file, str):
        return line, "", "", f"'path' must be a string, got {type(file).__name__}"
    if not file:
        return line, "", "", "empty 'path'"
    if caption is not None and not isinstance(caption, str):
        return line, "", "", f"'caption' must be a string or null, got {type(caption).__name__}"
    return line, file, caption or "", ""


def _jsonl_rows(path: Path) -> Iterator[Row]:
    for line, data in enumerate(path.read_bytes().split(b"\n"), start=1):
        text = data.decode("utf-8", errors="surrogateescape")
        if bad := _not_utf8(text):
            yield line, "", "", bad
        elif text.strip():
            yield _jsonl_row(line, text)


def from_manifest(path: Path) -> list[InputItem]:
    """One item per row of the manifest at `path`: its file with the row's caption, or a failure item."""
    where = str(path.resolve())
    try:
        rows = list(_csv_rows(path) if path.suffix.lower() == ".csv" else _jsonl_rows(path))
    except OSError as err:
        return [InputItem(where, OTHER, error=f"{where}: cannot read the manifest ({err.strerror})")]
    items = []
    for line, rel, caption, error in rows:
        if error:
            items.append(InputItem(f"{where}:{line}", OTHER, error=f"{where}:{line}: {error}"))
        else:
            file = Path(rel) if Path(rel).is_absolute() else path.parent / rel
            items.append(file_item(file, caption))
    return items
