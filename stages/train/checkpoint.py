"""Committed training checkpoints: DeepSpeed shards + per-rank state, a commit marker written last.

Layout of `train.out_dir/checkpoints/step_{step:08d}/`:

- `ds/state/…`       DeepSpeed's sharded model/optimizer/scheduler files (every rank writes its own);
- `rank_{r:05d}.pt`  rank r's RNG states (torch, CUDA, numpy, Python), training generator, loader
                     position and EMA weights: tensors, lists and numbers only, read with weights_only;
- `config.yaml`, `meta.json` (step, world size, ZeRO stage, precision);
- `ds/universal/`    made from `ds/state` when the run is resumed at another world size
                     (`stages/train/elastic.py`);
- `COMMITTED`        written by rank 0 after every rank has finished: resume only trusts directories that
                     have it, so a crash during a save never leaves training pointing at a partial one.

A disk that fills during a save raises `NoSpaceLeft` saying so; the step directory stays without its
marker. A checkpoint file that is truncated, corrupt or not what Tessera wrote (a pickle of anything but
tensors and numbers) is refused on load with a ValueError naming the file.

DeepSpeed's own loader unpickles with weights_only=False; ours swaps in a checkpoint engine that loads
with weights_only=True and allows only the few DeepSpeed types its files hold.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from stages.artifacts import MARKER, committed, step_dir
from stages.atomic import NoSpaceLeft, reporting_full_disk, write_text
from stages.train import elastic, ops


def resolve_resume(out_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: "none" → None; "auto" → the newest committed one (None when the
    run has none yet); else a directory, which must be a committed checkpoint."""
    if resume == "none":
        return None
    if resume == "auto":
        found = committed(out_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint directory")
    if not (path / MARKER).is_file():
        raise ValueError(
            f"--resume {resume}: not a committed checkpoint (no {MARKER} marker: a partial save?)"
        )
    return path


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(
    engine: Any,
    out_dir: str | Path,
    step: int,
    rank: int,
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    config_yaml: str,
    keep: int,
    exports: Any = None,
) -> Path:
    """Collective: every rank calls it. Writes the step directory, commits it, prunes to `keep`.

    `exports(directory)` (rank 0, before the commit) writes extra files such as safetensors weights.
    """
    directory = step_dir(out_dir, step)
    try:
        with reporting_full_disk(directory):
            _write(engine, directory, rank, rank_state, {"step": step, **meta}, config_yaml, exports)
    except NoSpaceLeft as err:
        raise NoSpaceLeft(
            f"{err}; {directory.name} is left without its {MARKER} marker, so a resume takes the last "
            "committed checkpoint: free space and resume"
        ) from err
    if rank == 0:
        for old in committed(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return directory


def _write(
    engine: Any,
    directory: Path,
    rank: int,
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    config_yaml: str,
    exports: Any,
) -> None:
    if rank == 0 and directory.exists():
        shutil.rmtree(directory)  # an uncommitted leftover of a crashed save of this step
    _barrier()
    engine.save_checkpoint(
        str(directory / "ds"), tag="state", client_state={"step": meta["step"]}, save_latest=False
    )
    torch.save(rank_state, directory / f"rank_{rank:05d}.pt")
    _barrier()  # every rank has written everything
    if rank == 0:
        if exports is not None:
            exports(directory)
        write_text(directory / "config.yaml", config_yaml)
        write_text(directory / "meta.json", json.dumps(meta, indent=2))
        write_text(directory / MARKER, f"{meta['step']}\n")


def load(
    engine: Any, directory: Path, rank: int, world_size: int, sequence_parallel: int = 1
) -> tuple[int, dict[str, Any]]:
    """Restore the engine from a committed checkpoint; returns (step, state). The state is this rank's
    saved state, or, for a checkpoint of another world size or parallel.sequence_parallel
    (`stages.train.elastic`), {"resized_from": saved world size, "sequence_from": its sequence_parallel,
    "loaders": every old sequence group's (the ranks of a group share one position), "emas": every old
    rank's, "zero3": whether the EMAs are ZeRO-3 partitions}."""
    if not (directory / MARKER).is_file():
        raise ValueError(f"{directory}: not a committed checkpoint")
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{directory}/meta.json: unreadable ({exc}); the checkpoint is corrupt") from exc
    saved_world = meta.get("world_size")
    if not isinstance(saved_world, int) or saved_world < 1:
        raise ValueError(f"{directory}/meta.json: world_size {saved_world!r} is not a positive integer")
    saved_sp = meta.get("sequence_parallel", 1)
    if not isinstance(saved_sp, int) or saved_sp < 1 or saved_world % saved_sp:
        raise ValueError(
            f"{directory}/meta.json: sequence_parallel {saved_sp!r} does not divide the world size"
        )
    resized = (saved_world, saved_sp) != (world_size, sequence_parallel)
    rank_files = [directory / f"rank_{r:05d}.pt" for r in (range(saved_world) if resized else [rank])]
    for rank_file in rank_files:
        if not rank_file.is_file():
            raise ValueError(f"{directory}: missing {rank_file.name}; the checkpoint is corrupt")
    engine.checkpoint_engine = safe_checkpoint_engine(engine.checkpoint_engine)
    if saved_world != world_size:
        path, client = elastic.load_engine(engine, directory, rank)
    else:
        path, client = engine.load_checkpoint(str(directory / "ds"), tag="state")
    if path is None:
        raise ValueError(f"{directory}/ds: DeepSpeed could not load the checkpoint; it is corrupt")
    if ops.uses_fused_adam(client.get("ds_config", {})) and not ops.uses_fused_adam(engine.config):
        ops.adopt_fused_adam_steps(engine.optimizer)
    if client.get("step") != meta["step"]:
        raise ValueError(
            f"{directory}: DeepSpeed state is for step {client.get('step')}, meta for {meta['step']}"
        )
    if not resized:
        return int(meta["step"]), load_tensors(rank_files[0])
    saved = [load_tensors(rank_file) for rank_file in rank_files]
    return int(meta["step"]), {
        "resized_from": saved_world,
        "sequence_from": saved_sp,
        "loaders": [state["loader"] for state in saved[::saved_sp]],
        "emas": [state["ema"] for state in saved],
        "zero3": meta.get("zero_stage") == 3,
    }


def load_tensors(path: str | Path, allowed: tuple[type, ...] = (), map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True (and the `allowed` classes); a file that is truncated, corrupt,
    or holds other objects is a ValueError naming it."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            # torch.serialization.load is torch.load; named so because stages.train.universal swaps
            # torch.load for this function while DeepSpeed's converter runs
            return torch.serialization.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch reports a torn zip, a bad pickle and a refused class in many types
        # torch's paragraphs of advice come first; the unpickler's own words follow its marker
        text = str(err).rpartition("WeightsUnpickler error:")[2]
        lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(err).__name__]
        refused = [line for line in lines if "GLOBAL" in line]
        reason = (refused or lines)[0].split(". ")[0].rstrip(".")
        if refused:
            raise ValueError(
                f"{path}: holds objects other than tensors and numbers, refused ({reason}); "
                "the checkpoint is corrupt or was not written by Tessera"
            ) from err
        raise ValueError(f"{path}: unreadable ({reason}); the checkpoint is truncated or corrupt") from err


def deepspeed_types() -> tuple[type, ...]:
    """The non-tensor types in DeepSpeed's ZeRO 1-3 optimizer-state files (the loss scaler is saved even
    in fp32): all that loading its files allows besides tensors and numbers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address


def safe_checkpoint_engine(engine: Any) -> Any:
    """Wrap a DeepSpeed checkpoint engine so `load` unpickles with weights_only=True."""
    allowed = deepspeed_types()

    def load(path: str, map_location: Any = None) -> Any:
        return load_tensors(path, allowed, map_location)

    engine.load = load
    return engine


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    generator.set_state(state["generator"])
