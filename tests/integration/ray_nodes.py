"""A Ray cluster of two nodes on this machine, started through `launch.sh ray-head` / `ray-worker`.

Both nodes are on 127.0.0.1 (distinct raylets, as Ray's own multi-node tests run them), in a private
temp dir under /tmp (short: AF_UNIX socket paths are limited to 107 bytes), on free ports. Every
process of the cluster is found by that temp dir in its command line or as a raylet's descendant and
killed by pid: `ray stop` would stop every Ray on the machine.

Authentication: the cluster has its own token file (RAY_AUTH_TOKEN_PATH, no RAY_AUTH_MODE), so the head
turns token auth on by Ray's rule, and workers and drivers must agree by the same rule
(`pipeline.ray_cluster.agree_on_auth`), whatever ~/.ray holds on the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from tests import ROOT, free_port

HEAD_CPUS, WORKER_CPUS = 1, 1
"""One CPU per node: a group of two 1-CPU training workers must take one on each node."""

FAST_HEALTH_CHECKS = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}
"""The GCS declares a killed node dead within ~2 s instead of Ray's default ~30 s."""


def node_env() -> dict[str, str]:
    """The environment of the cluster's nodes and drivers: this checkout's code, no other Ray's address."""
    own = ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
    env = {k: v for k, v in os.environ.items() if k not in own}
    # every rank's placement line reaches the driver (Ray folds lines alike across workers by default)
    extra = {"PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    return {**env, **FAST_HEALTH_CHECKS, **extra}


def _ports(*names: str) -> list[str]:
    return [f"--{name}={free_port()}" for name in names]


class TwoNodeCluster:
    """A head (HEAD_CPUS, resource `head`) and a worker node (WORKER_CPUS) that a test may kill and
    restart; `address` is the head's GCS, 127.0.0.1:PORT."""

    def __init__(self) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="tn", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        from ray._private.authentication.authentication_token_generator import (
            generate_new_authentication_token,
        )

        token = self.temp / "auth_token"
        token.write_text(generate_new_authentication_token())
        self.env = {
            **node_env(),
            "RAY_TMPDIR": str(self.temp),
            "RAY_PORT": str(self.port),
            "RAY_AUTH_TOKEN_PATH": str(token),
        }
        self.head_node = ""
        self.worker_node = ""
        self.worker_pids: set[int] = set()

    def launch(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [ROOT / "launch.sh", *args], env=self.env, capture_output=True, text=True, timeout=120
        )

    def start_head(self) -> None:
        done = self.launch(
            "ray-head",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={HEAD_CPUS}",
            '--resources={"head": 1}',
            f"--temp-dir={self.temp}",
            "--include-dashboard=false",
            *_ports("dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port"),
            *_ports("metrics-export-port"),
        )
        assert done.returncode == 0, done.stderr[-3000:]
        (self.head_node,) = self.raylet_nodes().values()

    def start_worker(self) -> None:
        before = {p.pid for p in self.processes()}
        done = self.launch(
            "ray-worker",
            self.address,
            f"--num-cpus={WORKER_CPUS}",
            *_ports("dashboard-agent-listen-port", "metrics-export-port"),
        )
        assert done.returncode == 0, done.stderr[-3000:]
        nodes = {pid: node for pid, node in self.raylet_nodes().items() if node != self.head_node}
        (self.worker_node,) = nodes.values()
        self.worker_pids = {p.pid for p in self.processes()} - before

    def raylet_nodes(self) -> dict[int, str]:
        """The node id of every raylet of this cluster, by pid."""
        nodes = {}
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                if proc.name() == "raylet":
                    flag = next(a for a in proc.cmdline() if a.startswith("--node_id="))
                    nodes[proc.pid] = flag.split("=", 1)[1]
        return nodes

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: its temp dir in the command line, or a descendant of one."""
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["cmdline"]):
            if any(str(self.temp) in arg for arg in proc.info["cmdline"] or ()):
                found[proc.pid] = proc
                with contextlib.suppress(psutil.Error):
                    found.update({child.pid: child for child in proc.children(recursive=True)})
        return list(found.values())

    def kill_worker(self) -> list[str]:
        """SIGKILL the worker node's raylet, then what else that node started; returns their names
        (a Ray worker's is its process title, e.g. `ray::_StageActor.run`)."""
        raylet = next(pid for pid, node in self.raylet_nodes().items() if node == self.worker_node)
        node = psutil.Process(raylet)
        doomed = [node, *node.children(recursive=True)]
        doomed += [psutil.Process(pid) for pid in self.worker_pids if psutil.pid_exists(pid)]
        names = []
        for proc in doomed:
            with contextlib.suppress(psutil.Error):
                names.append(proc.name())
                proc.send_signal(signal.SIGKILL)
        self.worker_node, self.worker_pids = "", set()
        return names

    def ensure_worker(self) -> None:
        """Start a fresh worker node unless one is up."""
        if not self.worker_node:
            self.start_worker()

    def stop(self) -> None:
        for _ in range(5):
            procs = self.processes()
            if not procs:
                break
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGKILL)
            time.sleep(0.5)
        shutil.rmtree(self.temp, ignore_errors=True)
