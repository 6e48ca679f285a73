"""Training under Ray Train: a 2-worker ZeRO-2 run on an in-process Ray, a worker killed by SIGKILL
that Ray restarts from the last committed checkpoint (reproducing the uninterrupted run), and
non-finite losses that stop the run without retries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from configs import load_config
from pipeline.ray_cluster import ensure_ray
from pipeline.ray_train import ray_train
from stages import artifacts
from stages.train import NonFiniteError
from tests import ROOT
from tests.integration.ray_train_faults import KILL_RECORD, train_then_die_once, train_with_nan_losses
from tests.integration.training_data import GEOMETRY, make_training_shards

STEPS, EVERY = 8, 4


@pytest.fixture(scope="module")
def ray_session():
    """An in-process Ray for this module, shut down afterwards unless it was already running."""
    import ray

    started_here = not ray.is_initialized()
    ensure_ray()
    yield
    if started_here:
        ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_training_shards(tmp_path_factory.mktemp("ray-train-data"))


def _cfg(shards: Path, out: Path, *extra: str):
    return load_config(
        [ROOT / "configs/tiny.yaml"],
        [
            *GEOMETRY,
            f"data.shards={shards}",
            f"train.out_dir={out}",
            "data.batch_size=2",
            "parallel.zero_stage=2",
            f"train.steps={STEPS}",
            f"train.checkpoint_every={EVERY}",
            "train.log_every=1",
            "train.lr=3e-3",
            "train.warmup_steps=4",
            *extra,
        ],
    )


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, float]:
    return {line["step"]: line["loss"] for line in _lines(out)}


@pytest.fixture(scope="module")
def uninterrupted(ray_session, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray-reference") / "run"
    return out, ray_train(_cfg(shards, out), workers=2)


def test_local_ray_workers_drop_the_placement_group_cleaner_warnings(ray_session):
    import logging

    import ray

    from pipeline.ray_cluster import PLACEMENT_GROUP_CLEANER_LOGGER

    @ray.remote(num_cpus=0)
    def level() -> int:
        return logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).getEffectiveLevel()

    assert ray.get(level.remote()) == logging.ERROR


def test_two_workers_train_to_the_end_with_committed_checkpoints(uninterrupted):
    out, result = uninterrupted
    assert result.step == STEPS and result.checkpoint == artifacts.step_dir(out, STEPS)
    assert artifacts.committed(out) == [artifacts.step_dir(out, s) for s in range(EVERY, STEPS + 1, EVERY)]
    meta = json.loads((result.checkpoint / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == 2
    assert sorted(p.name for p in result.checkpoint.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    losses = _losses(out)
    assert sorted(losses) == list(range(STEPS)) and np.isfinite(list(losses.values())).all()
    assert result.ray_dir.parent == out / "ray" and result.ray_dir.is_dir()


def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(
    ray_session, shards, tmp_path, uninterrupted
):
    ref_out, _ = uninterrupted
    out = tmp_path / "run"
    # resume="none" holds for the first attempt only: the restart must resume ("auto")
    result = ray_train(_cfg(shards, out), resume="none", workers=2, worker_fn=train_then_die_once)
    killed = json.loads((out / KILL_RECORD).read_text())
    assert killed["committed"] == ["step_00000004"], "rank 1 should die mid-run, after the first checkpoint"
    assert result.step == STEPS and result.checkpoint == artifacts.step_dir(out, STEPS)
    # Steps before the checkpoint keep their lines from the first attempt; the restarted group resumed
    # there (a fresh start would have rewritten every line after the kill).
    lines = _lines(out)
    assert [line["step"] for line in lines] == list(range(STEPS))
    assert [line["time"] < killed["time"] for line in lines] == [s < EVERY for s in range(STEPS)]
    assert _losses(out) == _losses(ref_out)
    ours, ref = (
        load_file(d / "exported" / "ema.safetensors")
        for d in (result.checkpoint, artifacts.step_dir(ref_out, STEPS))
    )
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ours)
    # one attempt marker: the restarted attempt saw it and did not report another
    assert len(list(result.ray_dir.glob("checkpoint_*/started.json"))) == 1


def test_non_finite_losses_stop_the_run_without_retries(ray_session, shards, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="2 non-finite steps in a row"):
        ray_train(_cfg(shards, out, "train.max_bad_steps=2"), workers=2, worker_fn=train_with_nan_losses)
    assert artifacts.committed(out) == []
