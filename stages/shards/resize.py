"""The loader position of a run resumed at another world size (elastic resume).

A loader's batches are a pure function of its settings and position (`stages.shards.loader`), so the
states every rank of the old world saved say exactly which samples that world yielded: for each of its
logical workers and each kind, every sample of the epochs it finished and the first `batch` batches of
the epoch it was in. The new world starts each of its workers at the earliest epoch an old worker was
in and skips what the old world yielded in it and in the later epochs some old worker had reached
(`ShardStream.seen_before` replays the old streams, reading sample JSON only). Within the interrupted
pass every sample is then seen exactly once: no duplicates, no gaps. The old world is kept in the new
state (`earlier`), so resuming the new world again at its own size, or resizing it again, skips the
same samples.
"""

from __future__ import annotations

from typing import Any

RESIZABLE = ("rank", "world_size", "num_workers")
"""Settings that may differ between the saved world and the resumed one; every other setting (batch
size, seed, mix, buffers, shard list) decides what was yielded and must stay."""


def past_world(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The old world as its rank states describe it: {world_size, num_workers, positions of every
    logical worker g = rank · workers + worker}."""
    world = len(states)
    settings = [state["settings"] for state in states]
    ranks = [s["rank"] for s in settings]
    if ranks != list(range(world)) or {s["world_size"] for s in settings} != {world}:
        raise ValueError(
            f"loader states of ranks {ranks} with world sizes {sorted({s['world_size'] for s in settings})}: "
            f"need the states of every rank 0..{world - 1} of one world"
        )
    workers = {s["num_workers"] for s in settings}
    if len(workers) != 1:
        raise ValueError(f"loader states disagree on num_workers: {sorted(workers)}")
    positions = [
        {"batches": int(p["batches"]), "video": list(p["video"]), "images": list(p["images"])}
        for state in states
        for p in state["workers"]
    ]
    return {"world_size": world, "num_workers": workers.pop(), "positions": positions}


def resized(
    states: list[dict[str, Any]], mine: dict[str, Any], workers: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(earlier worlds, positions of this rank's `workers` logical workers) that continue `states`, the
    saved loader states of every rank of another world, under this loader's settings `mine` (its
    fingerprint)."""
    if not states:
        raise ValueError("no loader states to resize")
    theirs = states[0]["settings"]
    differ = sorted(k for k in set(mine) | set(theirs) if k not in RESIZABLE and mine.get(k) != theirs.get(k))
    if differ:
        raise ValueError(
            "a resumed world may change only "
            + ", ".join(RESIZABLE)
            + " of the loader; these differ: "
            + ", ".join(f"{k}: saved {theirs.get(k)!r}, now {mine.get(k)!r}" for k in differ)
        )
    world = past_world(states)
    earlier = [*states[0].get("earlier", []), world]
    start = {kind: min(p[kind][0] for p in world["positions"]) for kind in ("video", "images")}
    positions = [{"batches": 0, "video": [start["video"], 0], "images": [start["images"], 0]}] * workers
    return earlier, [dict(p, video=list(p["video"]), images=list(p["images"])) for p in positions]
