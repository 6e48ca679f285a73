"""The DeepSpeed hostfile launcher (`HOSTFILE=... ./launch.sh train`) over ssh/pdsh to an sshd of this
test on 127.0.0.1, with two hostfile entries that both reach the loopback as two "hosts": the run
trains and commits, and a second run resumes from its last checkpoint. SSH_PORT and MASTER_ADDR reach
the launcher, `--local_rank` the CLI, and the virtualenv the remote side."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from stages import artifacts
from tests import ROOT, free_port, without_rendezvous
from tests.integration.training_data import GEOMETRY, make_training_shards

TOOLS = {"sshd": "/usr/sbin/sshd", "ssh": shutil.which("ssh"), "ssh-keygen": shutil.which("ssh-keygen")}
TOOLS["pdsh"] = shutil.which("pdsh")
MISSING = [name for name, path in TOOLS.items() if not path or not os.path.exists(path)]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs {', '.join(MISSING)} (Debian: openssh-server openssh-client pdsh)"
)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An sshd on a free 127.0.0.1 port taking root by this test's key only, and a `bin/ssh` that uses
    the key (what a user's ~/.ssh/config does); yields (port, bin directory). Stopped by pid."""
    root = tmp_path_factory.mktemp("sshd")
    keygen = TOOLS["ssh-keygen"]
    for name in ("host_key", "user_key"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", root / name], check=True)
    shutil.copy(root / "user_key.pub", root / "authorized_keys")
    port = free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\nPidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\n"
    )
    (root / "ssh_config").write_text(
        f"Host *\n  IdentityFile {root / 'user_key'}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n"
    )
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f'#!/bin/sh\nexec {TOOLS["ssh"]} -F {root / "ssh_config"} "$@"\n')
    (bin_dir / "ssh").chmod(0o755)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
    daemon = subprocess.Popen([TOOLS["sshd"], "-D", "-e", "-f", root / "sshd_config"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert daemon.poll() is None and time.monotonic() < deadline, daemon.stderr.read().decode()
                time.sleep(0.05)
        yield port, bin_dir
    finally:
        daemon.kill()
        daemon.wait()


def test_hostfile_launch_trains_commits_and_resumes(sshd, tmp_path):
    port, bin_dir = sshd
    shards = make_training_shards(tmp_path / "data")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out = tmp_path / "run"
    env = without_rendezvous()
    env |= {"HOSTFILE": str(hostfile), "SSH_PORT": str(port), "MASTER_ADDR": "127.0.0.1"}
    env |= {"PATH": f"{bin_dir}:{env['PATH']}", "OMP_NUM_THREADS": "1"}

    def launch(steps: int) -> str:
        args = [*GEOMETRY, f"data.shards={shards}", f"train.out_dir={out}", "data.batch_size=2"]
        args += ["train.warmup_steps=1", f"train.steps={steps}", "train.checkpoint_every=2"]
        env["MASTER_PORT"] = str(free_port())
        done = subprocess.run(
            [str(ROOT / "launch.sh"), "train", "configs/tiny.yaml", *args, "--quiet"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        return done.stdout + done.stderr

    first = launch(2)
    assert "world size         2" in first, first[-3000:]
    assert [d.name for d in artifacts.committed(out)] == ["step_00000002"]
    ranks = {p.name for p in artifacts.step_dir(out, 2).glob("rank_*.pt")}
    assert ranks == {"rank_00000.pt", "rank_00001.pt"}
    second = launch(4)
    assert f"resuming from {artifacts.step_dir(out, 2)} (step 2)" in second, second[-3000:]
    assert artifacts.committed(out)[-1].name == "step_00000004"
