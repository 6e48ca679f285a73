"""Ray Data adapter for the preprocessing stage: shard tasks → a pool of actors → shard records.

Each actor owns one killable decode process (`stages.preprocess.DecodeProcess`) and runs `process_shard`,
the same function the local executor runs, so Ray only decides where the work happens. Everything reaches the
actors through arguments (the config dataclass), never through driver globals.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from configs import RunConfig
from pipeline.ray_cluster import ensure_ray
from stages.media import ClipSpec
from stages.preprocess import (
    DecodeProcess,
    InputItem,
    ShardExecutor,
    ShardTask,
    caption_embedder,
    process_shard,
)


class _ShardWriter:
    """Ray Data actor: one decode process, many shards."""

    def __init__(self, cfg: RunConfig, out: str) -> None:
        self.cfg = cfg
        self.out = Path(out)
        p = cfg.preprocess
        self.decoder = DecodeProcess(ClipSpec.from_config(cfg), p.decode_timeout_s, p.recycle_after)
        self.embedder = caption_embedder(cfg)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        task = json.loads(row["task"])
        shard_task = ShardTask(
            task["index"], task["name"], tuple(InputItem(**item) for item in task["items"])
        )
        record = process_shard(shard_task, self.cfg, self.out, self.decoder, self.embedder)
        return {"record": json.dumps(record)}


def ray_executor(address: str | None = None) -> ShardExecutor:
    """An executor for `run_preprocess` that runs shard tasks on Ray (in-process unless `address`)."""

    def run(tasks: list[ShardTask], cfg: RunConfig, out: Path) -> Iterator[dict[str, Any]]:
        if not tasks:
            return
        import ray.data

        ensure_ray(address)
        rows = [
            {
                "task": json.dumps(
                    {"index": t.index, "name": t.name, "items": [dataclasses.asdict(i) for i in t.items]}
                )
            }
            for t in tasks
        ]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
            _ShardWriter,
            fn_constructor_kwargs={"cfg": cfg, "out": str(out.resolve())},
            concurrency=max(1, min(cfg.preprocess.workers, len(tasks))),
            num_cpus=1,
        )
        for row in dataset.iter_rows():
            yield json.loads(row["record"])

    return run
