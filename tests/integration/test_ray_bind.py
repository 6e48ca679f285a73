"""The in-process Ray listens on the loopback interface only: every socket of a real local session."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

from tests import ROOT

SESSION = """
import json
import psutil, ray
from pipeline.ray_cluster import ensure_ray

ensure_ray(num_cpus=1)

@ray.remote
def task():
    return 1

@ray.remote
class Actor:
    def ping(self):
        return 2

actor = Actor.remote()
assert ray.get(task.remote()) == 1 and ray.get(actor.ping.remote()) == 2  # worker servers are up
me = psutil.Process()
listening = []
for proc in [me, *me.children(recursive=True)]:
    try:
        sockets = proc.net_connections(kind="inet")
    except psutil.NoSuchProcess:
        continue
    listening += [[proc.name(), s.laddr.ip, s.laddr.port] for s in sockets if s.status == psutil.CONN_LISTEN]
print(json.dumps({
    "node": ray.util.get_node_ip_address(),
    "manager": ray.nodes()[0]["NodeManagerAddress"],
    "listening": listening,
    "pids": [p.pid for p in me.children(recursive=True)],
}))
ray.shutdown()
"""

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def test_a_local_ray_listens_on_loopback_only():
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    }
    proc = subprocess.run(
        [sys.executable, "-c", SESSION],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    session = json.loads(proc.stdout.strip().splitlines()[-1])
    for pid in session["pids"]:  # whatever of the session outlived ray.shutdown()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    assert session["node"] == session["manager"] == "127.0.0.1"
    names = {name for name, _, _ in session["listening"]}
    assert {"gcs_server", "raylet"} <= names and any(name.startswith("ray::") for name in names), names
    public = [entry for entry in session["listening"] if entry[1] not in LOOPBACK]
    assert not public, public
