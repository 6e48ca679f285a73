"""Shared output of the benchmarks: an aligned table on stdout and a JSON record on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def print_table(rows: list[dict[str, Any]]) -> None:
    """Rows of equal keys as left-aligned columns."""
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths)))


def write_record(path: Path, record: dict[str, Any]) -> None:
    """The benchmark's JSON record (machine, command, date, rows) at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")
