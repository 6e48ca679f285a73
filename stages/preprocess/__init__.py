"""Dataset preprocessing: inputs (folders, globs, manifests, raw-video tars) → clips → patch shards,
every input accounted for, resumable. `run_preprocess(cfg, inputs)` is the job; it runs without Ray
(threads driving killable decode processes, `local_shard_executor`) or with the Ray Data executor of
`pipeline.ray_preprocess`, which runs the same `process_shard` in its actors.

Nothing here imports torch at import time: decode child processes import this package.
"""

from stages.preprocess.decode_process import DecodeFailure, DecodeProcess
from stages.preprocess.discover import InputItem, count_by_kind, discover, is_input, media_kind
from stages.preprocess.job import (
    CaptionEmbedder,
    ShardExecutor,
    ShardTask,
    caption_embedder,
    local_shard_executor,
    manifest_table,
    process_shard,
    run_preprocess,
)

__all__ = [
    "CaptionEmbedder",
    "DecodeFailure",
    "DecodeProcess",
    "InputItem",
    "ShardExecutor",
    "ShardTask",
    "caption_embedder",
    "count_by_kind",
    "discover",
    "is_input",
    "local_shard_executor",
    "manifest_table",
    "media_kind",
    "process_shard",
    "run_preprocess",
]
