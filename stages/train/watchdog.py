"""The step watchdog of a multi-process training: a rank whose peers stop answering names them and exits.

Why: a *killed* peer breaks its sockets and the next collective fails at once, but a *frozen* one (a hung
GPU, an NFS stall, SIGSTOP) keeps its sockets open, and a collective waits on it: NCCL without its async
error handling, a collective DeepSpeed issues outside the process group's timeout, or a rendezvous-store
call can wait for good. The process-group timeout (`parallel.collective_timeout_s`, given to
`init_distributed`) covers the collectives that honour it; this thread covers the rest and says who is
lost, which neither gloo's "Timed out waiting 3000ms for recv" nor NCCL's message does.

How: every rank's thread writes a heartbeat (a counter and the rank's step) into the launcher's
rendezvous store (its own client of MASTER_ADDR:MASTER_PORT, so a stuck main thread never blocks it)
every `timeout / 4` seconds. When no step finished on this rank within the timeout, or a collective raised
(`fail`), it reads every rank's heartbeat twice, a few beats apart: ranks whose counter did not move are
lost; when the store itself does not answer, the ranks of its node (rank 0's: torchrun's node-0 agent or
rank 0 itself hosts it) are. It prints one line naming them and leaves with `EXIT_LOST_PEER` without the
interpreter's teardown (which would wait on the stuck collective), so the launcher tears the node down.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

EXIT_LOST_PEER = 1
"""Exit status of a rank that lost a peer (a runtime failure, like a non-finite run)."""

_PREFIX = "tessera/watchdog"


def node_id() -> str:
    """This process's node as the launchers number them: torchrun's GROUP_RANK, the DeepSpeed launcher's
    CROSS_RANK, SLURM_NODEID, else the host name."""
    env = os.environ
    for name in ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID"):
        if name in env:
            return f"node {env[name]}"
    return socket.gethostname()


class StepWatchdog:
    """A daemon thread that exits the process when no step finished within `timeout_s` (see the module
    docstring). `progress(step)` after every step and checkpoint; `fail(error)` when a collective raised."""

    def __init__(self, rank: int, world: int, timeout_s: float, address: str, port: int) -> None:
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.beat_s = max(0.1, min(1.0, timeout_s / 4))
        env = os.environ  # torchrun's store outlives a restart of the workers: keys per run and restart
        run = f"{env.get('TORCHELASTIC_RUN_ID', 'run')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.store = dist.PrefixStore(
            f"{_PREFIX}/{run}",
            dist.TCPStore(
                address,
                port,
                is_master=False,
                timeout=timedelta(seconds=max(1.0, 2 * self.beat_s)),
                wait_for_workers=False,
            ),
        )
        self.step = 0
        self.last_progress = time.monotonic()
        self.armed = False
        """Whether the stall check runs: from the training loop's start on (`progress`)."""
        self.beats = 0
        self.store.set(f"node/{rank}", node_id())
        self._beat()
        self._stop = threading.Event()
        self._exiting = threading.Lock()
        self.nodes: dict[int, str] = {}
        self.thread = threading.Thread(target=self._run, name="tessera-step-watchdog", daemon=True)

    @classmethod
    def from_env(cls, rank: int, world: int, timeout_s: float) -> StepWatchdog | None:
        """A started (beating, not yet armed) watchdog for a multi-process world whose launcher gave
        MASTER_ADDR/MASTER_PORT; None for a world of one. Start it right after joining the world: a peer
        that is still starting up beats as "starting", and the others wait for it instead of naming it."""
        env = os.environ
        if world < 2 or "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            return None
        watchdog = cls(rank, world, timeout_s, env["MASTER_ADDR"], int(env["MASTER_PORT"]))
        watchdog.thread.start()
        return watchdog

    def progress(self, step: int) -> None:
        """The training loop started at `step`, or step `step` (and its checkpoint) finished on this rank;
        arms the stall check."""
        self.step, self.last_progress, self.armed = step, time.monotonic(), True

    def stop(self) -> None:
        """Training ended on this rank: no more stall checks (a peer may finish later)."""
        self._stop.set()

    def fail(self, error: BaseException) -> None:
        """A collective may have raised (a peer's socket broke, the process-group timeout fired): name the
        lost ranks and exit; returns when every peer still beats at this rank's step (not a lost peer)."""
        message = (str(error).splitlines() or [type(error).__name__])[0][:160]
        self._lost(f"a collective failed at step {self.step + 1} ({message})", only_if_lost=True)

    # ---- the thread --------------------------------------------------------------------------------

    def _beat(self) -> None:
        self.beats += 1
        phase = "training" if self.armed else "starting"
        self.store.set(f"beat/{self.rank}", f"{self.beats} {self.step} {phase}")

    def _run(self) -> None:
        while not self._stop.wait(self.beat_s):
            if not self.nodes:
                self.nodes = self._bounded(self._read_nodes) or {}
            self._bounded(self._beat)  # a store that stopped answering: only the stall check below can tell
            stalled = time.monotonic() - self.last_progress
            if self.armed and stalled > self.timeout_s and not self._stop.is_set():
                self._lost(f"no training step finished within {self.timeout_s:g} s after step {self.step}")

    def _read_nodes(self) -> dict[int, str]:
        return {r: self.store.get(f"node/{r}").decode() for r in range(self.world)}

    def _bounded(self, call: Callable[[], Any]) -> Any:
        """`call()`'s result, or None when it raised or the store did not answer within two beats (a
        TCPStore call to a frozen server can outlast the client's own timeout, so it runs on a thread of
        its own that is given up on)."""
        found: list[Any] = []

        def run() -> None:
            with contextlib.suppress(Exception):
                found.append(call())

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(timeout=max(1.0, 2 * self.beat_s) + 0.5)
        return found[0] if found else None

    def _read_beats(self) -> dict[int, str] | None:
        """Every peer's heartbeat, or None when the store does not answer."""
        peers = [r for r in range(self.world) if r != self.rank]
        return self._bounded(lambda: {r: self.store.get(f"beat/{r}").decode() for r in peers})

    def _lost(self, why: str, only_if_lost: bool = False) -> None:
        """Print one line naming the ranks that stopped beating, then leave the process. With
        `only_if_lost`, return instead when every peer beats at this rank's step."""
        if not self._exiting.acquire(blocking=False):  # the other thread is reporting: let it exit
            while True:
                time.sleep(60)
        first = self._read_beats()
        time.sleep(3 * self.beat_s)
        second = self._read_beats() if first is not None else None
        if second is None:
            store_node = self.nodes.get(0, "rank 0's node")
            lost = sorted(r for r, node in self.nodes.items() if node == store_node and r != self.rank) or [0]
            detail = f"the rendezvous store on {store_node} does not answer"
        else:
            lost = sorted(r for r in first if first[r] == second[r])
            detail = f"no heartbeat for {3 * self.beat_s:g} s"
            if not lost and any(value.split()[2] == "starting" for value in second.values()):
                self.last_progress = time.monotonic()  # a peer still starts up (loads a checkpoint): wait
                self._exiting.release()
                return
            if not lost:  # every peer beats: the one that is stuck is the one furthest behind
                steps = {r: int(value.split()[1]) for r, value in second.items()}
                behind = min(steps.values())
                if only_if_lost and behind >= self.step:
                    self._exiting.release()
                    return
                lost = sorted(r for r, s in steps.items() if s == behind)
                detail = f"alive but stuck at step {behind}"
        names = ", ".join(str(r) for r in lost)
        where = ", ".join(sorted({self.nodes[r] for r in lost if r in self.nodes}))
        print(
            f"error: rank {self.rank}: {why}; lost rank(s) {names}{f' ({where})' if where else ''}: {detail} "
            f"(parallel.collective_timeout_s = {self.timeout_s:g}); exiting so that the launcher stops "
            "this node; relaunch every node to resume from the last committed checkpoint",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(EXIT_LOST_PEER)
