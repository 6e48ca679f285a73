"""`./launch.sh slurm` on a real single-host SLURM cluster (tests/integration/slurm_cluster.py): a 2-rank
CPU training job, preemption by SIGTERM that checkpoints, requeues and resumes to the same weights as an
uninterrupted run, the sbatch's GPU defaults that a CPU node must override, and bad input that says so in
the job's output."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages import artifacts
from tests import ROOT, without_rendezvous
from tests.integration.slurm_cluster import Cluster, free_port, missing_programs, start_cluster
from tests.integration.training_data import GEOMETRY, make_training_shards

pytestmark = pytest.mark.skipif(missing_programs() is not None, reason=str(missing_programs()))

CPU_NODE = ["--gpus-per-node=0", "--cpus-per-task=1", "--nodes=1", "--ntasks-per-node=2", "--time=10"]
"""The command line's overrides of the sbatch's 8-GPU defaults: 2 ranks of 1 CPU on the 2-CPU node."""
STEPS = 16


@dataclass
class Job:
    id: str
    output: Path
    """The job's output file (stdout and stderr of the batch shell and of every task)."""

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    running = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield running
    finally:
        try:  # no job left running training processes once the daemons are gone
            running.client("scancel", "--full", "--user=root")
            _wait(lambda: not _squeue(running), 30, "an empty queue", running)
        finally:
            running.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_training_shards(tmp_path_factory.mktemp("slurm-data"))


def _env(cluster: Cluster) -> dict[str, str]:
    """The submitter's environment, which the job inherits (sbatch --export=ALL): the cluster's config,
    a free rendezvous port, one OMP thread per rank (exact losses depend on it)."""
    base = {k: v for k, v in without_rendezvous().items() if not k.startswith("SLURM_")}
    return {**base, **cluster.env, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}


def _submit(cluster: Cluster, submit_dir: Path, options: list[str], *train_args: str) -> Job:
    """`./launch.sh slurm OPTIONS -- ARGS` from `submit_dir`, a fresh folder (no runs/ yet)."""
    submit_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [*cluster.prefix, str(ROOT / "launch.sh"), "slurm", *options, "--", *train_args],
        cwd=submit_dir, env=_env(cluster), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = re.search(r"^Submitted batch job (\d+)$", proc.stdout, re.M)
    output = re.search(r"^output: (.+)$", proc.stdout, re.M)
    assert job and output, proc.stdout
    return Job(job[1], submit_dir / output[1])


def _training(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(ROOT / "configs/tiny.yaml"), *GEOMETRY, f"data.shards={shards}", f"train.out_dir={out}",
        f"train.steps={STEPS}", "train.checkpoint_every=1000", "train.log_every=1", "train.lr=3e-3",
        "train.warmup_steps=4", "--quiet", *extra,
    ]  # fmt: skip


def _squeue(cluster: Cluster) -> str:
    return cluster.client("squeue", "-h").stdout.strip()


def _job(cluster: Cluster, job: Job) -> dict[str, str]:
    """The job's fields as `scontrol show job` prints them (JobState, Reason, Restarts, ExitCode...)."""
    return dict(re.findall(r"(\w+)=(\S*)", cluster.client("scontrol", "-o", "show", "job", job.id).stdout))


def _wait(ready, timeout: float, what: str, cluster: Cluster, job: Job | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            output = job.text()[-3000:] if job else ""
            pytest.fail(f"no {what} after {timeout} s\n{output}\n--- slurmd\n{cluster.log('slurmd')[-2000:]}")
        time.sleep(0.2)


def _ended(cluster: Cluster, job: Job, timeout: float = 120) -> dict[str, str]:
    _wait(lambda: _job(cluster, job).get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"},
          timeout, f"end of job {job.id}", cluster, job)  # fmt: skip
    return _job(cluster, job)


def _logged_steps(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return sum('"loss"' in line for line in metrics.read_text().splitlines()) if metrics.exists() else 0


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    final = artifacts.committed(out)[-1]
    assert final.name == f"step_{STEPS:08d}", final
    return load_file(final / "exported" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(cluster, shards, tmp_path_factory) -> tuple[Job, Path]:
    """A job that runs its STEPS to the end; its folder, where it was submitted, starts without runs/."""
    submit = tmp_path_factory.mktemp("uninterrupted")
    job = _submit(cluster, submit, CPU_NODE, *_training(shards, submit / "run"))
    state = _ended(cluster, job)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", (state, job.text()[-3000:])
    return job, submit / "run"


def test_a_job_trains_two_ranks_and_commits_a_checkpoint_its_output_in_a_fresh_runs_folder(uninterrupted):
    job, out = uninterrupted
    assert job.output.parent.name == "runs" and job.output.name == f"slurm-{job.id}.out"
    text = job.text()
    assert "world size         2" in text and "master localhost:" in text, text[-3000:]
    assert f"job {job.id}: training finished" in text
    assert _logged_steps(out) == STEPS
    (final,) = artifacts.committed(out)
    assert {p.name for p in final.glob("rank_*.pt")} == {"rank_00000.pt", "rank_00001.pt"}


def test_sigterm_before_the_limit_checkpoints_requeues_and_resumes_to_the_uninterrupted_weights(
    cluster, shards, tmp_path, uninterrupted
):
    """`scancel --signal=TERM --batch` is what the sbatch's `--signal=B:TERM@300` sends at the limit."""
    out = tmp_path / "run"
    job = _submit(cluster, tmp_path, CPU_NODE, *_training(shards, out))
    _wait(lambda: _logged_steps(out) >= 3, 90, "3 logged steps", cluster, job)
    cluster.client("scancel", "--signal=TERM", "--batch", job.id, check=True)
    _wait(lambda: _job(cluster, job).get("Restarts") == "1" and _job(cluster, job)["JobState"] == "PENDING",
          60, "requeued job", cluster, job)  # fmt: skip
    (saved,) = artifacts.committed(out)  # the preemption checkpoint, before the configured steps
    stopped = int(saved.name.removeprefix("step_"))
    assert 3 <= stopped < STEPS
    # SLURM holds a requeued job for about 2 minutes (its begin time) so that the node has revoked the
    # previous run's credential; release it once the node is idle and that revocation's second has passed
    _wait(lambda: cluster.node_state() == "idle", 30, "idle node", cluster, job)
    time.sleep(2)
    cluster.client("scontrol", "update", f"JobId={job.id}", "StartTime=now", check=True)
    state = _ended(cluster, job)
    text = job.text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", (state, text[-3000:])
    assert f"stopped by SIGTERM at step {stopped}" in text and "requeueing to resume" in text, text[-3000:]
    assert "start 2 on" in text and f"resuming from {saved} (step {stopped})" in text, text[-3000:]
    assert _logged_steps(out) == STEPS  # the steps before and after the requeue, each once
    resumed, reference = _final_weights(out), _final_weights(uninterrupted[1])
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in resumed)


def test_a_missing_config_fails_the_job_with_the_reason_in_its_output(cluster, tmp_path):
    job = _submit(cluster, tmp_path, CPU_NODE, str(tmp_path / "missing.yaml"))
    state = _ended(cluster, job)
    text = job.text()
    # srun reports the highest task status: 2 (bad input) from both ranks, or 143 when one rank's exit 2
    # had the other killed by --kill-on-bad-exit first
    assert state["JobState"] == "FAILED" and state["ExitCode"] in {"2:0", "143:0"}, (state, text[-3000:])
    assert f"config file not found: {tmp_path / 'missing.yaml'}" in text, text[-3000:]
    code = state["ExitCode"].split(":")[0]
    assert f"training failed with exit status {code}" in text and "not requeued" in text, text[-3000:]
    assert state["Restarts"] == "0"


def test_the_sbatch_gpu_defaults_stay_pending_on_a_cpu_node(cluster, tmp_path):
    """Without the command line's overrides the job asks for 8 GPUs and 12 CPUs per task: SLURM keeps it
    pending (Reason=PartitionConfig), which docs/TRAINING.md's troubleshooting names."""
    job = _submit(cluster, tmp_path, [], str(tmp_path / "unused.yaml"))
    try:
        _wait(lambda: _job(cluster, job).get("Reason") == "PartitionConfig", 30, "PartitionConfig", cluster)
        assert _job(cluster, job)["JobState"] == "PENDING"
    finally:
        cluster.client("scancel", job.id)


def test_the_cluster_listens_on_the_loopback_only(cluster):
    """The daemons bind every interface (SLURM 22.05 has no bind setting): in the cluster's own network
    namespace those are the loopback's addresses, and the host's network has no socket of theirs."""
    if not cluster.prefix:
        pytest.skip("no network namespace here (unshare --net needs root): the host network is used")
    addresses = cluster.client("ip", "-o", "addr", check=True).stdout.splitlines()
    assert addresses and all(line.split()[1] == "lo" for line in addresses), addresses
    port = re.search(r"^SlurmctldPort=(\d+)$", cluster.conf.read_text(), re.M)[1]
    host = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, timeout=30, check=True).stdout
    assert f":{port} " not in host and cluster.client("ss", "-Hltn").stdout.count(f":{port} ") == 1


def test_a_sigterm_to_one_rank_stops_both_after_the_same_step(cluster, shards, tmp_path):
    """The ranks agree on a stop (stages/train/loop.py): a signal that reaches one rank only, as a late one
    does for a moment, checkpoints both at the same step instead of leaving the other in a collective.
    The batch shell got no signal, so the job ends COMPLETED, not requeued (docs/TRAINING.md)."""
    out = tmp_path / "run"
    job = _submit(cluster, tmp_path, CPU_NODE, *_training(shards, out))
    _wait(lambda: _logged_steps(out) >= 3, 90, "3 logged steps", cluster, job)
    listed = cluster.client("scontrol", "listpids", job.id).stdout.splitlines()  # PID JOB STEP LOCAL GLOBAL
    (rank1,) = [int(row[0]) for row in map(str.split, listed[1:]) if row[2] == "0" and row[4] == "1"]
    os.kill(rank1, signal.SIGTERM)
    state = _ended(cluster, job, timeout=60)
    text = job.text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "0", (state, text[-3000:])
    (saved,) = artifacts.committed(out)
    stopped = int(saved.name.removeprefix("step_"))
    assert 3 <= stopped < STEPS and text.count(f"stopped by SIGTERM at step {stopped};") == 2, text[-3000:]
    assert {p.name for p in saved.glob("rank_*.pt")} == {"rank_00000.pt", "rank_00001.pt"}
