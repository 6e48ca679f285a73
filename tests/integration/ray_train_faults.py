"""A training worker function that dies for real, for the Ray Train restart test.

It lives in an importable module (not a test file) because Ray Train workers import `ray_train`'s
`worker_fn` by name.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import torch.distributed as dist

from configs import RunConfig
from stages import artifacts
from stages.train import TrainResult, train

KILL_RECORD = "killed.json"
"""Written into `train.out_dir` by the rank that kills itself; its presence means: never again."""


def _kill_after_first_checkpoint(out: Path) -> None:
    while not artifacts.committed(out):
        time.sleep(0.02)
    record = {"time": time.time(), "committed": [d.name for d in artifacts.committed(out)]}
    (out / KILL_RECORD).write_text(json.dumps(record))
    os.kill(os.getpid(), signal.SIGKILL)


def train_then_die_once(cfg: RunConfig, *, resume: str, progress: bool) -> TrainResult:
    """`train`, except that rank 1 SIGKILLs its own process as soon as the run's first checkpoint is
    committed, once per `train.out_dir`."""
    out = Path(cfg.train.out_dir)
    if dist.get_rank() == 1 and not (out / KILL_RECORD).exists():
        threading.Thread(target=_kill_after_first_checkpoint, args=(out,), daemon=True).start()
    return train(cfg, resume=resume, progress=progress)


def train_with_nan_losses(cfg: RunConfig, *, resume: str, progress: bool) -> TrainResult:
    """`train` with every step's loss made NaN, so it stops with NonFiniteError."""
    return train(cfg, resume=resume, progress=progress, fault=lambda step: True)
