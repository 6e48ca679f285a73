"""A Ray cluster of two nodes on this machine (`launch.sh ray-head` + `ray-worker 127.0.0.1:PORT`) and
the pipeline's jobs on it, with the worker node's raylet killed mid-job: training restarts from the
last checkpoint to the uninterrupted run's weights (elastic, it continues on the node that remains;
with no room left, it fails in bounded time), preprocessing writes the uninterrupted job's shards,
rendering on replica pools finishes every prompt once, with the one-process render's videos."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from configs import RenderConfig, load_cascade
from stages import artifacts
from stages.render import load_video_tensor, render
from tests import ROOT
from tests.integration.ray_nodes import TwoNodeCluster, free_port
from tests.integration.training_data import GEOMETRY, make_training_shards
from tests.render_fixtures import VIDEO_STAGES, build_cascade

pytestmark = pytest.mark.integration

STEPS, EVERY = 12, 4
PLACED = re.compile(r"\[ray_train\] rank (\d+) of 2 on node ([0-9a-f]+)")
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}


@pytest.fixture(scope="module")
def cluster():
    nodes = TwoNodeCluster()
    try:
        nodes.start_head()
        nodes.start_worker()
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(autouse=True)
def worker_node(cluster):
    """Every test starts with both nodes up: a worker node a test killed is replaced first."""
    cluster.ensure_worker()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_training_shards(tmp_path_factory.mktemp("nodes-data"))


def _pipeline(cluster: TwoNodeCluster, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=ROOT,
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 150) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return out


def _when(ready: Callable[[], bool], proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"ended before the kill: {_finish(proc)[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting to kill the worker node"
        time.sleep(0.05)


def _train(cluster: TwoNodeCluster, shards: Path, out: Path, *extra: str) -> subprocess.Popen:
    return _pipeline(
        cluster,
        "train",
        str(ROOT / "configs/tiny.yaml"),
        *GEOMETRY,
        f"data.shards={shards}",
        f"train.out_dir={out}",
        "data.batch_size=2",
        f"train.steps={STEPS}",
        f"train.checkpoint_every={EVERY}",
        "train.log_every=1",
        "train.lr=3e-3",
        "train.warmup_steps=4",
        "--ray",
        "--address",
        cluster.address,
        "--workers",
        "2",
        "--quiet",
        *extra,
    )


def _ema(out: Path) -> dict[str, torch.Tensor]:
    return load_file(artifacts.step_dir(out, STEPS) / "exported" / "ema.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(cluster, shards, tmp_path_factory):
    cluster.ensure_worker()
    out = tmp_path_factory.mktemp("nodes-train") / "run"
    log = _finish(_train(cluster, shards, out))
    return out, log


def test_both_nodes_listen_on_loopback_only(cluster):
    listening = []
    for proc in cluster.processes():
        try:
            sockets = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        listening += [(proc.name(), s.laddr.ip) for s in sockets if s.status == psutil.CONN_LISTEN]
    assert sum(name == "raylet" for name, _ in listening) >= 2 and any(
        n == "gcs_server" for n, _ in listening
    )
    assert [entry for entry in listening if entry[1] not in LOOPBACK] == []


def test_the_head_runs_with_token_auth(cluster):
    head = next(p for p in cluster.processes() if p.name() == "gcs_server")
    assert head.environ().get("RAY_AUTH_MODE") == "token"


@pytest.mark.parametrize(
    ("auth", "says"),
    [
        ({"RAY_AUTH_MODE": "disabled"}, "refused this process's authentication (RAY_AUTH_MODE=disabled)"),
        ({"RAY_AUTH_TOKEN": "not-the-token"}, "refused this process's authentication (RAY_AUTH_MODE=token)"),
        ({"RAY_PORT": "0"}, "no Ray cluster answers at 127.0.0.1:"),
    ],
    ids=["no-auth", "wrong-token", "no-head"],
)
def test_a_worker_that_cannot_join_says_why_at_once(cluster, auth, says):
    address = f"127.0.0.1:{free_port()}" if "RAY_PORT" in auth else cluster.address
    started = time.monotonic()
    done = subprocess.run(
        [ROOT / "launch.sh", "ray-worker", address, "--num-cpus=1"],
        env={**cluster.env, **auth},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and says in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().count("\n") == 0 and time.monotonic() - started < 20
    assert len(cluster.raylet_nodes()) == 2  # nothing joined


def test_a_driver_given_an_unreachable_address_fails_in_one_line(cluster, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    train = ["train", str(ROOT / "configs/tiny.yaml"), f"train.out_dir={tmp_path}", "--ray", "--quiet"]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *train, "--address", address],
        cwd=ROOT,
        env={**cluster.env, "RAY_ADDRESS": cluster.address},  # the explicit address wins
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert (
        done.stderr.startswith(f"error: no Ray cluster answers at {address}") and done.stderr.count("\n") == 1
    )


def test_training_places_one_worker_on_each_node_and_commits(cluster, uninterrupted):
    out, log = uninterrupted
    assert artifacts.committed(out) == [artifacts.step_dir(out, s) for s in range(EVERY, STEPS + 1, EVERY)], (
        log
    )
    placed = dict(PLACED.findall(log))
    assert set(placed) == {"0", "1"}, log[-3000:]
    assert {placed["0"], placed["1"]} == {cluster.head_node, cluster.worker_node}


def test_a_lost_worker_node_restarts_training_from_the_last_checkpoint(
    cluster, shards, tmp_path, uninterrupted
):
    ref, _ = uninterrupted
    out = tmp_path / "run"
    proc = _train(cluster, shards, out)
    _when(lambda: bool(artifacts.committed(out)), proc)
    lost = cluster.worker_node
    assert any(name.startswith("ray::RayTrainWorker") for name in cluster.kill_worker())
    at_kill = artifacts.committed(out)
    cluster.start_worker()  # room for the new group: a fresh worker node
    log = _finish(proc)
    assert proc.returncode == 0, log[-3000:]
    assert artifacts.step_dir(out, STEPS) not in at_kill, "the run ended before its worker node was lost"
    # the first group on the head and the lost node, the second on the head and the fresh node
    assert {node for _, node in PLACED.findall(log)} == {cluster.head_node, lost, cluster.worker_node}
    ours, theirs = _ema(out), _ema(ref)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_an_elastic_training_continues_on_the_node_that_remains(cluster, shards, tmp_path):
    """--min-workers 1: the group restarted after the worker node is lost (and not replaced) has one
    rank, which resumes the two-rank checkpoint at world size 1 and finishes. Ray's elastic policy reads
    the cluster's resources from a coordinator that refreshes them every 20 s, so restarts in that time
    still count the lost node's CPU and wait for two workers: 4 waits of 12 s outlast it."""
    out = tmp_path / "run"
    proc = _train(cluster, shards, out, "--min-workers", "1", "--wait-for-workers-s", "12")
    _when(lambda: bool(artifacts.committed(out)), proc)
    lost = cluster.worker_node
    assert any(name.startswith("ray::RayTrainWorker") for name in cluster.kill_worker())
    at_kill = artifacts.committed(out)
    log = _finish(proc)
    assert proc.returncode == 0, log[-3000:]
    assert artifacts.step_dir(out, STEPS) not in at_kill, "the run ended before its worker node was lost"
    assert "resized from world size 2 to 1" in log, log[-3000:]
    final = artifacts.step_dir(out, STEPS)
    assert json.loads((final / "meta.json").read_text())["world_size"] == 1
    assert set(re.findall(r"\[ray_train\] rank 0 of 1 on node ([0-9a-f]+)", log)) == {cluster.head_node}
    assert lost != cluster.head_node


def test_training_without_room_after_a_lost_node_fails_in_bounded_time(cluster, shards, tmp_path):
    """The worker node is lost before the run starts (killing it mid-run, measured at 9 s from the kill
    to the failure, costs the 30 s of a run's start up to its first checkpoint): the group, two 1-CPU
    workers, no longer fits on the one CPU left, and the run fails after 4 waits (1 + Ray Train's 3
    retries) of --wait-for-workers-s."""
    cluster.kill_worker()
    started = time.monotonic()
    proc = _train(cluster, shards, tmp_path / "run", "--wait-for-workers-s", "2")
    log = _finish(proc, timeout=90)
    took = time.monotonic() - started
    assert proc.returncode == 1, log[-3000:]
    message = "Ray could not place 2 training workers (1 CPU each) within 2 s, 4 times (the cluster has 1 CPU"
    assert message in log, log[-3000:]
    assert took < 60, f"{took:.0f} s to the failure"  # 4 waits of 2 s, and the starts
    assert artifacts.committed(tmp_path / "run") == []


def test_preprocess_with_a_lost_worker_node_writes_the_uninterrupted_shards(cluster, shards, tmp_path):
    """The uninterrupted job is `shards`' own (the same inputs and settings, without Ray)."""
    inputs = str(shards.parent / "synth")
    overrides = [*GEOMETRY, "preprocess.files_per_shard=2", "preprocess.workers=2"]
    out = tmp_path / "ray"
    proc = _pipeline(
        cluster, "preprocess", inputs, "--out", str(out), *overrides, "--address", cluster.address
    )
    _when(lambda: any(out.glob("shards/*.tar")), proc)
    assert any(name.startswith("ray::") for name in cluster.kill_worker())  # one of the 2 shard writers
    manifest_at_kill = (out / "manifest.json").exists()
    cluster.start_worker()  # the lost actor's replacement needs a CPU
    log = _finish(proc)
    assert proc.returncode == 0, log[-3000:]
    assert not manifest_at_kill, "the job ended before its worker node was lost"
    ours, theirs = (json.loads((d / "manifest.json").read_text()) for d in (out, shards))
    assert ours["failed"] == 0 and len(ours["shards"]) == 12
    assert ours["shards"] == theirs["shards"]  # names, sample counts and sha256s


def test_render_with_a_lost_node_finishes_every_prompt_once(cluster, tmp_path):
    cascade = build_cascade(tmp_path, VIDEO_STAGES)
    prompts = [f"prompt number {i}" for i in range(8)]
    local = render(
        load_cascade(cascade), prompts, RenderConfig(out_dir=str(tmp_path / "local"), batch_size=2)
    )
    out = tmp_path / "renders"
    args = ["render", "--cascade", str(cascade), "--out", str(out), "--batch-size", "2", "--no-sheet"]
    args += ["--workers", "4", *(a for p in prompts for a in ("--prompt", p))]
    proc = _pipeline(cluster, *args, "--address", cluster.address)
    _when(lambda: any(out.glob("*/video.json")), proc)
    assert any(name.startswith("ray::_StageActor") for name in cluster.kill_worker())  # replicas spread
    done_at_kill = len(list(out.glob("*/video.json")))
    log = _finish(proc)
    assert proc.returncode == 0, log[-3000:]
    assert done_at_kill < len(prompts), "the render ended before its worker node was lost"
    folders = sorted(p.parent for p in out.glob("*/video.json"))
    assert (
        len(folders)
        == len(prompts)
        == len({json.loads((f / "video.json").read_text())["prompt"] for f in folders})
    )
    assert (out / "failures.jsonl").read_text() == ""
    files = sorted(p.relative_to(local.out_dir) for p in local.out_dir.glob("*/stages/*.safetensors"))
    assert len(files) == len(prompts) * len(VIDEO_STAGES)
    for rel in files:  # the same videos bit for bit as one process rendering them
        assert torch.equal(load_video_tensor(out / rel), load_video_tensor(local.out_dir / rel)), rel
