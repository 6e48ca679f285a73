"""Resuming a committed checkpoint at another world size (a node lost, a larger allocation).

What is re-sharded, and how:

- Model and optimizer: DeepSpeed's universal checkpoint. Rank 0 converts the step's DeepSpeed state
  once (`stages.train.universal`, into `ds/universal/` beside it; every rank waits) and every rank loads
  its new partition from it. Why DeepSpeed's own format rather than a conversion of ours: it already
  re-partitions the fp32 master weights and Adam moments of ZeRO 1-3 and of the bf16 optimizer, for
  any source and target size, and it is what DeepSpeed's engines read natively. A state with nothing
  partitioned (ZeRO-0: one model-states file holding the optimizer too) loads as saved.
- EMA: the saved per-rank EMAs (whole tensors, or under ZeRO-3 each rank's flat partition) are joined
  into whole tensors and cut again for this rank (`ema_for_rank`).
- Loader: every old rank's position, re-mapped so that within the interrupted pass every sample is
  seen exactly once (`stages.shards.resize`).
- Random streams: the training generator of every rank is seeded afresh from (seed, step, rank).

Not bit-exact, and the resume plan says so: the global batch changes with the world size (the
learning-rate schedule goes by step, as before), the samples of the interrupted pass are spread over
other ranks in another order, and the noise, time and crop draws are new.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

UNIVERSAL = "universal"
"""The DeepSpeed tag (folder under `ds/`) of a step's universal checkpoint."""


def partitioned(directory: Path) -> bool:
    """Whether the step's saved optimizer state is partitioned over ranks (ZeRO 1-3, DeepSpeed's bf16
    optimizer: per-rank `*optim_states.pt` files), so that another world size needs DeepSpeed's
    universal checkpoint to load it."""
    return any((directory / "ds" / "state").glob("*optim_states.pt"))


def load_engine(engine: Any, directory: Path, rank: int) -> tuple[str | None, dict[str, Any]]:
    """Collective: load the DeepSpeed state of committed `directory` into an engine of another world size
    (converted to a universal checkpoint first where the state is partitioned)."""
    ds = directory / "ds"
    if not partitioned(directory):
        return engine.load_checkpoint(str(ds), tag="state")
    if rank == 0 and not (ds / UNIVERSAL).is_dir():
        _convert(ds)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    config = engine._config  # DeepSpeed reads the switch from its config at load time
    config.load_universal_checkpoint = True
    try:
        return engine.load_checkpoint(str(ds), tag=UNIVERSAL)
    finally:
        config.load_universal_checkpoint = False


def _convert(ds: Path) -> None:
    """`ds/state` → `ds/universal`, written under a temporary name and renamed when complete (rank 0,
    under the run's folder lock: a leftover of an interrupted conversion is removed first)."""
    for leftover in ds.glob(f"{UNIVERSAL}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    partial = ds / f"{UNIVERSAL}.tmp-{os.getpid()}"
    done = subprocess.run(
        [sys.executable, "-m", "stages.train.universal", str(ds / "state"), str(partial)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit {done.returncode}"
        raise ValueError(f"{ds / 'state'}: DeepSpeed's universal-checkpoint conversion failed ({reason})")
    partial.rename(ds / UNIVERSAL)


def ema_for_rank(
    saved: list[list[Tensor]], saved_zero3: bool, params: list[torch.nn.Parameter], rank: int, world: int
) -> list[Tensor]:
    """This rank's EMA tensors, as `Ema.load` takes them, from every old rank's saved EMA list: whole
    tensors (any rank's, all equal) or, under ZeRO-3, flat partitions joined in rank order."""
    out = []
    for i, param in enumerate(params):
        shape = tuple(getattr(param, "ds_shape", param.shape))
        numel = math.prod(shape)
        if saved_zero3:
            whole = torch.cat([ranks[i].flatten() for ranks in saved])[:numel]
        else:
            whole = saved[0][i].flatten()
        if whole.numel() != numel:
            raise ValueError(f"EMA tensor {i}: {whole.numel()} values saved, the model's has {numel}")
        local = getattr(param, "ds_tensor", None)
        if local is None:
            out.append(whole.view(shape).clone())
            continue
        size = local.numel()  # ZeRO-3: ceil(numel / world) values per rank, the last one zero-padded
        padded = torch.zeros(size * world, dtype=whole.dtype)
        padded[:numel] = whole
        out.append(padded[rank * size : (rank + 1) * size].clone())
    return out


def generator_seed(seed: int, step: int, rank: int) -> int:
    """The training generator's seed for data-parallel `rank` of a world resized at `step`."""
    return (seed * 1_000_003 + step * 7_919 + rank) % (2**63)


def resize_note(
    directory: Path, saved: tuple[int, int], now: tuple[int, int], zero_stage: int, batch: int
) -> str:
    """What resuming committed `directory`, saved by (world size, sequence_parallel) `saved`, at `now`
    does, for the training plan."""
    (saved_world, saved_sp), (world, sp) = saved, now
    if saved_world == world:
        how = "as saved (same world size)"
    elif partitioned(directory):
        how = f"DeepSpeed universal checkpoint (ZeRO-{zero_stage})"
    else:
        how = "as saved (nothing partitioned)"
    layout = f"world size {saved_world} to {world}"
    if (saved_sp, sp) != (1, 1):
        layout += (
            f" (data-parallel × sequence-parallel {saved_world // saved_sp}×{saved_sp} to {world // sp}×{sp})"
        )
    return (
        f"resized from {layout}: model and optimizer {how}, EMA re-cut; the interrupted pass continues over "
        f"{world // sp} data-parallel ranks with no sample repeated or skipped. Not bit-exact: the global "
        f"batch is now {batch * world // sp} (was {batch * saved_world // saved_sp}) and the random draws "
        "restart"
    )
