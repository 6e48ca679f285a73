"""torchrun across two "nodes" on 127.0.0.1 (`NNODES=2 NODE_RANK=0|1 ./launch.sh train`, one process
each): the run trains and commits; its rendezvous store listens on MASTER_ADDR only and each rank gets
OMP threads; a frozen node (SIGSTOP of all its processes) and a killed launcher each make the other node
exit non-zero within parallel.collective_timeout_s and a few heartbeats, naming the lost rank; a killed
launcher takes its worker with it; a relaunch of both nodes resumes and ends on the uninterrupted run's
weights."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from stages import artifacts
from tests import free_port
from tests.integration.torchrun_nodes import Node
from tests.integration.training_data import GEOMETRY, make_training_shards

TIMEOUT_S = 3.0
"""parallel.collective_timeout_s of these runs."""
DETECT_S = TIMEOUT_S + 3 * 0.75 + 8
"""How soon the surviving node must have exited: the timeout, the watchdog's heartbeat check (3 beats of
timeout/4) and torchrun tearing the node down."""
STEPS = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_training_shards(tmp_path_factory.mktemp("torchrun-data"))


def _args(shards: Path, out: Path) -> list[str]:
    return [
        "configs/tiny.yaml",
        *GEOMETRY,
        f"data.shards={shards}",
        f"train.out_dir={out}",
        "data.batch_size=2",
        "train.warmup_steps=2",
        f"train.steps={STEPS}",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=10",
        f"parallel.collective_timeout_s={TIMEOUT_S}",
    ]


class Pair:
    """Both nodes of one run; reaped at teardown whatever happened."""

    def __init__(self, shards: Path, out: Path, logs: Path) -> None:
        self.port = free_port()
        logs.mkdir(parents=True, exist_ok=True)
        self.nodes = [Node(rank, self.port, _args(shards, out), logs / f"node{rank}.log") for rank in (0, 1)]

    def wait_all(self, timeout: float = 240) -> list[int]:
        return [node.wait(timeout) for node in self.nodes]

    def reap(self) -> None:
        for node in self.nodes:
            node.reap()


@pytest.fixture
def pairs():
    """`pairs(shards, out, logs)` starts both nodes of a run; every node is reaped at teardown."""
    started: list[Pair] = []

    def start(shards: Path, out: Path, logs: Path) -> Pair:
        started.append(Pair(shards, out, logs))
        return started[-1]

    yield start
    for pair in started:
        pair.reap()


def _wait_committed(out: Path, step: int, pair: Pair, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not (artifacts.step_dir(out, step) / artifacts.MARKER).exists():
        assert time.monotonic() < deadline, f"no committed step {step}"
        for node in pair.nodes:
            assert node.proc.poll() is None, node.output()
        time.sleep(0.01)


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    final = artifacts.step_dir(out, STEPS)
    return {name: load_file(final / "exported" / f"{name}.safetensors") for name in ("model", "ema")}


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted two-node run, with what the test saw of its sockets and threads while it ran."""
    root = tmp_path_factory.mktemp("torchrun-reference")
    out = root / "run"
    pair = Pair(shards, out, root / "logs")
    try:
        workers = [node.workers() for node in pair.nodes]
        threads = [w[0].environ().get("OMP_NUM_THREADS") for w in workers]
        listening = []
        deadline = time.monotonic() + 60
        while not any(c.laddr.port == pair.port for c in listening) and time.monotonic() < deadline:
            listening = [
                conn for node in pair.nodes for process in node.processes() for conn in _listening(process)
            ]
            time.sleep(0.05)
        codes = pair.wait_all()
        assert codes == [0, 0], [node.output() for node in pair.nodes]
    finally:
        pair.reap()
    return out, threads, listening, pair.port


def _listening(process: psutil.Process) -> list:
    try:
        return [c for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return []


def test_two_nodes_train_with_the_store_on_master_addr_and_omp_threads(reference):
    out, threads, listening, port = reference
    assert [d.name for d in artifacts.committed(out)] == [f"step_{s:08d}" for s in (2, 4, 6, 8)]
    store = [c for c in listening if c.laddr.port == port]
    assert store and all(c.laddr.ip == "127.0.0.1" for c in store), store  # torchrun's own: every interface
    assert all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for c in listening), listening
    cpus = len(psutil.Process().cpu_affinity())
    assert threads == [str(max(1, cpus // 2))] * 2  # both nodes on this machine share its CPUs


def test_a_frozen_node_is_named_and_a_relaunch_resumes_to_the_same_weights(
    shards, tmp_path, pairs, reference
):
    out = tmp_path / "run"
    pair = pairs(shards, out, tmp_path / "frozen")
    _wait_committed(out, 2, pair)
    frozen, survivor = pair.nodes[1], pair.nodes[0]
    frozen.signal_all(signal.SIGSTOP)  # a hung GPU or an NFS stall: sockets open, nobody answers
    tick = time.monotonic()
    code = survivor.wait(timeout=60)
    took = time.monotonic() - tick
    assert code != 0 and took < DETECT_S, (code, took, survivor.output())
    assert "lost rank(s) 1 (node 1)" in survivor.output(), survivor.output()
    frozen.reap()
    resumed_from = artifacts.committed(out)[-1]
    assert resumed_from.name != f"step_{STEPS:08d}", "the freeze should land mid-run"

    relaunch = pairs(shards, out, tmp_path / "relaunch")
    assert relaunch.wait_all() == [0, 0], [node.output() for node in relaunch.nodes]
    step = int(resumed_from.name.split("_")[1])
    assert f"resuming from {resumed_from} (step {step})" in relaunch.nodes[0].output()
    ref = _final_weights(reference[0])
    got = _final_weights(out)
    for name in ref:
        assert ref[name].keys() == got[name].keys()
        assert all(torch.equal(ref[name][k], got[name][k]) for k in ref[name]), name


def test_a_frozen_store_node_is_named_by_the_other(shards, tmp_path, pairs):
    out = tmp_path / "run"
    pair = pairs(shards, out, tmp_path / "logs")
    _wait_committed(out, 2, pair)
    frozen, survivor = pair.nodes[0], pair.nodes[1]  # node 0's agent hosts the rendezvous store
    frozen.signal_all(signal.SIGSTOP)
    tick = time.monotonic()
    code = survivor.wait(timeout=60)
    took = time.monotonic() - tick
    assert code != 0 and took < DETECT_S, (code, took, survivor.output())
    assert "lost rank(s) 0 (node 0)" in survivor.output(), survivor.output()


def test_a_killed_launcher_takes_its_worker_and_the_other_node_down(shards, tmp_path, pairs):
    out = tmp_path / "run"
    pair = pairs(shards, out, tmp_path / "logs")
    _wait_committed(out, 2, pair)
    killed, survivor = pair.nodes[1], pair.nodes[0]
    workers = killed.workers()
    tick = time.monotonic()
    killed.agent.send_signal(signal.SIGKILL)  # the agent only: its workers are in sessions of their own
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, f"orphaned workers train on: {alive}"
    code = survivor.wait(timeout=60)
    took = time.monotonic() - tick
    assert code != 0 and took < DETECT_S, (code, took, survivor.output())
    assert "lost rank(s) 1 (node 1)" in survivor.output(), survivor.output()
