"""Two torchrun "nodes" on 127.0.0.1 for the multi-node tests: each is `./launch.sh train` with
NNODES=2, its NODE_RANK and one process, in a session of its own; `Node` freezes, kills and reaps a node's
processes (its agent and every descendant: torchrun starts each worker in a session of its own, so a
process group is not the whole node)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from tests import ROOT

RENDEZVOUS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"}
"""Variables of this test process a node must not inherit (in-process runs set some)."""


class Node:
    """One node: `./launch.sh train ARGS` as NODE_RANK `rank` of two, output in `log`."""

    def __init__(self, rank: int, port: int, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.rank, self.log = rank, log
        base = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
        node_env = {"NNODES": "2", "NODE_RANK": str(rank), "NPROC_PER_NODE": "1"}
        node_env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [str(ROOT / "launch.sh"), "train", *args, "--quiet"],
                cwd=ROOT,
                env={**base, **node_env, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.agent = psutil.Process(self.proc.pid)  # launch.sh execs the torchrun agent

    def processes(self) -> list[psutil.Process]:
        """The agent and its descendants still alive."""
        try:
            return [self.agent, *self.agent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def workers(self, timeout: float = 120) -> list[psutil.Process]:
        """The agent's training processes, once they have started."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [p for p in self.processes()[1:] if "pipeline" in " ".join(_cmdline(p))]
            if found:
                return found
            assert self.proc.poll() is None, self.output()
            time.sleep(0.1)
        raise AssertionError(f"node {self.rank} started no worker within {timeout} s")

    def signal_all(self, sig: signal.Signals) -> None:
        for process in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def reap(self) -> None:
        """Thaw and kill whatever of the node is left (teardown, also after a failure)."""
        left = self.processes()
        for sig in (signal.SIGCONT, signal.SIGKILL):
            for process in left:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.send_signal(sig)
        self.proc.wait(timeout=30)
        psutil.wait_procs(left, timeout=10)


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []
