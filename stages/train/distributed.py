"""The process group of a training process: joining the launcher's world, and leaving it."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from configs.schema import ParallelConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STARTUP_GRACE_S = 300.0
"""The least process-group timeout (see `init_distributed`)."""

PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal this process gets when the thread that started it exits."""


def die_with_launcher() -> None:
    """Linux: SIGKILL this process when its launcher (torchrun's agent, the DeepSpeed launcher) dies, so
    that a killed launcher leaves no orphaned rank training on; torchrun starts its workers in sessions
    of their own, so nothing else reaches them. Exits at once when the launcher is already gone (the
    process was re-parented to init). Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() == 1:
        print("error: the launcher of this rank is gone; not starting", file=sys.stderr, flush=True)
        os._exit(1)


def init_distributed(timeout_s: float = ParallelConfig.collective_timeout_s) -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (RANK/WORLD_SIZE/LOCAL_RANK and
    MASTER_ADDR/PORT, as torchrun, the DeepSpeed launcher and Ray Train set them; SLURM variables are
    mapped); a lone process gets a world of one. nccl on CUDA, gloo on CPU. DeepSpeed's communication
    builds no op (`stages.train.ops.skip_shared_memory_comm`).

    timeout_s (parallel.collective_timeout_s): the process group's timeout, how long a gloo or NCCL
    collective waits for a peer before it raises (NCCL: with its async error handling, torch's default),
    but at least `STARTUP_GRACE_S`: ranks start up (imports, engine build, checkpoint loading) less in step
    than they train, and a collective of that phase must not give up on a slower peer. In the training
    loop the step watchdog (`stages/train/watchdog.py`) enforces `timeout_s` itself. A launcher-spawned
    rank also dies with its launcher (`die_with_launcher`)."""
    import deepspeed

    from stages.train.ops import skip_shared_memory_comm

    skip_shared_memory_comm()
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        timeout = timedelta(seconds=max(timeout_s, STARTUP_GRACE_S))
        if "RANK" in env:
            die_with_launcher()
            deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        else:  # a lone process: a private world of one, without exporting rendezvous variables
            env.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine insists on it
            deepspeed.init_distributed(
                dist_backend=backend,
                timeout=timeout,
                auto_mpi_discovery=False,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
            )
    local = int(env.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), local


def leave_distributed(code: int) -> int:
    """The last call of a launcher-spawned process: destroys the process group and returns `code`. A rank
    of a multi-process gloo world instead exits here with `code`, after flushing its output, skipping the
    interpreter's teardown.

    Why: each gloo group keeps worker threads that release a finished collective's tensors a moment after
    the caller has moved on, and releasing a tensor that Python has seen takes the GIL. If that moment
    falls after the interpreter has begun to finalize, the thread cannot take the GIL and the process
    aborts ("terminate called without an active exception", SIGABRT; pytorch/pytorch#190489), so a run
    that finished and saved everything is reported as a failed rank. Destroying the groups does not
    join those threads while DeepSpeed's objects still hold the groups. Under torch 2.13 on a loaded
    2-core machine this aborted about one two-rank run in twenty."""
    if not (dist.is_available() and dist.is_initialized()):
        return code
    import deepspeed.comm

    gloo_ranks = dist.get_backend() == "gloo" and dist.get_world_size() > 1
    deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's references to the groups
    if not gloo_ranks:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
