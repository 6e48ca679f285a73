"""Plain-text tables and durations for what jobs print: the plan before a run and the summary after it."""

from __future__ import annotations

from collections.abc import Sequence


def key_value_table(rows: Sequence[tuple[str, object]]) -> str:
    """One `name  value` line per row, the names left-aligned to the longest."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def column_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A header line and one line per row, every column left-aligned to its widest cell."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(f"{v!s:<{w}}" for v, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    )


def format_duration(seconds: float) -> str:
    """A wall time as `45s`, `3m 12s` or `2h 05m 09s`."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"
