"""A real single-host SLURM cluster for tests: munged, slurmctld and slurmd started from a generated
slurm.conf in a temporary folder, each by pid, and stopped by pid.

Everything the daemons keep (munge key and socket, state, spool, logs, pid files) lives in that folder,
and the ports are free ones, so the cluster touches nothing of the machine's own SLURM or munge. Clients
(sbatch, squeue, scontrol) find it through SLURM_CONF (`Cluster.env`).

SLURM 22.05 has no setting for the address its daemons listen on (slurmctld, slurmd and srun bind every
interface), so where the test may create a network namespace (root, as in CI) the cluster runs in one of
its own whose only interface is the loopback: its daemons, the jobs' tasks and every client command
(`Cluster.prefix`) see 127.0.0.1 and nothing else. Elsewhere it falls back to the host's network.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests import free_port

DAEMONS = {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client"}
"""Programs the cluster needs → the Debian package that has each (.ci/packages.txt)."""


def missing_programs() -> str | None:
    """Why the cluster cannot start here (a program not installed), or None."""
    path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    absent = [f"{name} ({package})" for name, package in DAEMONS.items() if not shutil.which(name, path=path)]
    return f"SLURM test cluster needs {', '.join(absent)}" if absent else None


def _memory_mb() -> int:
    """The node's real memory as slurmd counts it (MemTotal), so slurmd does not drain the node."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def slurm_conf(root: Path, munge_socket: Path, ctld_port: int, slurmd_port: int, cpus: int) -> str:
    """One node (localhost, 127.0.0.1, `cpus` CPUs, no GPUs), one default partition, root everywhere."""
    return f"""\
ClusterName=tessera-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=60
KillWait=5
SchedulerParameters=sched_interval=1
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    """A running test cluster: its folder, its config file and its daemons' processes."""

    root: Path
    conf: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    prefix: list[str] = field(default_factory=list)
    """What runs a command inside the cluster's network namespace (nsenter ...); empty: the host's."""

    @property
    def env(self) -> dict[str, str]:
        """What a client (sbatch, squeue, scontrol, launch.sh slurm) needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def client(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        """A SLURM client command (squeue, scontrol, scancel...) against this cluster; its output as text."""
        env = {**os.environ, **self.env}
        return subprocess.run(
            [*self.prefix, *args], env=env, capture_output=True, text=True, timeout=30, check=check
        )

    def node_state(self) -> str:
        """The node's state as sinfo names it (idle, allocated...); empty while slurmctld does not answer."""
        result = self.client("sinfo", "-h", "-N", "-o", "%T")
        return result.stdout.strip() if result.returncode == 0 else ""

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM each daemon by pid (slurmd first), SIGKILL what is still running 10 s later."""
        for name in ("slurmd", "slurmctld", "munged", "netns"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _loopback_namespace(cluster: Cluster) -> None:
    """A network namespace held by a sleeping process (`procs["netns"]`), its loopback up; on success
    `cluster.prefix` enters it. Without the privilege to create one, nothing changes."""
    # the loopback's 192.0.2.1 (TEST-NET-1, in no other namespace): getaddrinfo(AI_ADDRCONFIG), with which
    # the daemons pick their listening address, finds nothing where only 127.0.0.1 and ::1 are configured
    setup = "ip link set lo up && ip addr add 192.0.2.1/32 dev lo && echo up && exec sleep infinity"
    holder = subprocess.Popen(
        ["unshare", "--net", "sh", "-c", setup],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )  # fmt: skip
    if holder.stdout.readline().strip() != "up":
        holder.kill()
        holder.wait(timeout=10)
        return
    cluster.procs["netns"] = holder
    cluster.prefix = ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--"]


def start_cluster(root: Path, cpus: int = 2, timeout: float = 60.0) -> Cluster:
    """munged, slurmctld and slurmd in the foreground (-D/-F), as child processes of this one; returns
    once the node is idle. On a failure every daemon already started is stopped and the error names the
    logs."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir(exist_ok=True)
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munge_socket = root / "munge" / "munge.socket"
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, munge_socket, free_port(), free_port(), cpus))
    cluster = Cluster(root, conf)
    env = {**os.environ, **cluster.env}
    sbin = "/usr/sbin"
    try:
        if shutil.which("unshare") and shutil.which("nsenter") and shutil.which("ip", path="/usr/sbin:/sbin"):
            _loopback_namespace(cluster)
        cluster.procs["munged"] = subprocess.Popen(
            [f"{sbin}/munged", "-F", "--force", f"--key-file={key}", f"--socket={munge_socket}",
             f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/munged.log",
             f"--seed-file={root}/munge/munged.seed", "--num-threads=2"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        _wait(lambda: munge_socket.exists(), timeout, "munged socket", cluster)
        for name, args in (
            ("slurmctld", [f"{sbin}/slurmctld", "-D", "-i", "-f", str(conf)]),
            ("slurmd", [f"{sbin}/slurmd", "-D", "-N", "localhost", "-f", str(conf)]),
        ):
            cluster.procs[name] = subprocess.Popen(
                [*cluster.prefix, *args], env=env, stdout=(root / f"{name}.out").open("w"),
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        _wait(lambda: cluster.node_state() == "idle", timeout, "node localhost idle", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait(ready, timeout: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        dead = [name for name, proc in cluster.procs.items() if proc.poll() is not None]
        if dead:
            break
        time.sleep(0.2)
    logs = "\n".join(f"--- {name}\n{cluster.log(name)[-2000:]}" for name in ("munged", "slurmctld", "slurmd"))
    raise RuntimeError(f"SLURM test cluster: no {what} after {timeout:.0f} s; logs in {cluster.root}\n{logs}")
