"""Resuming a committed checkpoint at another world size (2 → 1, 1 → 2, 2 → 3 ranks; ZeRO 0 to 3):
the weights, Adam moments and EMA are re-sharded exactly, the run trains on, and a planted file is
refused. That the loader sees every sample of the interrupted pass once is counted in
tests/unit/shards/test_resize.py."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from configs import load_config
from stages import artifacts
from stages.train import train
from stages.train.checkpoint import deepspeed_types, load_tensors
from stages.train.loop import TrainingRun
from stages.train.trainer import full_state
from tests import ROOT, free_port, without_rendezvous
from tests.integration.training_data import GEOMETRY, make_training_shards

RESIZED = "resized from world size {} to {}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_training_shards(tmp_path_factory.mktemp("elastic-data"))


def _overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        *GEOMETRY,
        f"data.shards={shards}",
        f"train.out_dir={out}",
        "data.batch_size=2",
        "data.image_fraction=0.25",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.lr=3e-3",
        "train.warmup_steps=2",
        *extra,
    ]


def _launch(nproc: int, shards: Path, out: Path, *extra: str) -> str:
    """`./launch.sh train` with `nproc` CPU processes; returns its output (the run must succeed)."""
    env = without_rendezvous()
    env.update(NPROC_PER_NODE=str(nproc), MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [str(ROOT / "launch.sh"), "train", "configs/tiny.yaml", *_overrides(shards, out, *extra), "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


def _cfg(shards: Path, out: Path, *extra: str):
    return load_config([ROOT / "configs/tiny.yaml"], _overrides(shards, out, *extra))


def _resumed(cfg) -> TrainingRun:
    """This process as a world of one, resumed from the run's newest committed checkpoint."""
    run = TrainingRun(cfg, None)
    with run.holding_out_dir():
        run.start("auto")
    return run


def _exported(step: Path, name: str) -> dict[str, torch.Tensor]:
    return {f"dit.{k}": v for k, v in load_file(step / "exported" / f"{name}.safetensors").items()}


def _assert_state(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 0.0
) -> None:
    assert expected and all(k in state for k in expected)
    worst = max((state[k] - v).abs().max().item() for k, v in expected.items())
    assert worst <= atol, worst


def _rank_files(step: Path) -> set[str]:
    return {p.name for p in step.glob("rank_*.pt")}


@pytest.fixture(scope="module")
def zero2_run(shards, tmp_path_factory) -> Path:
    """A two-rank ZeRO-2 run committed at step 2."""
    out = tmp_path_factory.mktemp("zero2") / "run"
    _launch(2, shards, out, "parallel.zero_stage=2", "train.steps=2")
    return out


def test_zero2_two_ranks_resume_on_one_then_on_two_again(shards, zero2_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(zero2_run, out)
    cfg = _cfg(shards, out, "parallel.zero_stage=2", "train.steps=4")
    saved = artifacts.committed(out)[-1]

    run = _resumed(cfg)  # 2 → 1
    assert run.step == 2
    _assert_state(full_state(run.engine.module, zero3=False), _exported(saved, "model"))
    _assert_state(run._ema_state(), _exported(saved, "ema"))
    # Adam's moments and master weights: the two old partitions, joined, are the new single one
    old = [
        load_tensors(
            saved / "ds" / "state" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", deepspeed_types()
        )
        for r in range(2)
    ]
    opt = run.engine.optimizer
    for g, flat in enumerate(opt.single_partition_of_fp32_groups):
        n = sum(p.numel() for p in opt.bit16_groups[g])
        parts = [o["optimizer_state_dict"] for o in old]
        for key in ("exp_avg", "exp_avg_sq"):
            joined = torch.cat([p["base_optimizer_state"]["state"][g][key] for p in parts])[:n]
            assert torch.equal(joined, opt.optimizer.state[flat][key][:n]), key
        assert torch.equal(torch.cat([p["single_partition_of_fp32_groups"][g] for p in parts])[:n], flat[:n])
    del run

    result = train(cfg, progress=False)  # trains on as a world of one, to step 4
    assert result.step == 4 and result.checkpoint.name == "step_00000004"
    assert _rank_files(result.checkpoint) == {"rank_00000.pt"}

    output = _launch(2, shards, out, "parallel.zero_stage=2", "train.steps=6")  # 1 → 2
    assert RESIZED.format(1, 2) in output and "Not bit-exact" in output
    final = artifacts.committed(out)[-1]
    assert final.name == "step_00000006" and _rank_files(final) == {"rank_00000.pt", "rank_00001.pt"}
    assert json.loads((final / "meta.json").read_text())["world_size"] == 2
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {line["step"] for line in losses if "loss" in line} >= {4, 5}  # steps 5 and 6 (0-based)


def test_zero3_partitions_are_joined_for_one_rank_and_cut_again_for_three(shards, tmp_path):
    out = tmp_path / "run"
    # a 10^6-step warm-up: every step moves the weights by ~1e-8, so that a step after the resize is
    # next to nothing and the export it commits shows the re-cut partitions
    still = "train.warmup_steps=1000000"
    _launch(2, shards, out, "parallel.zero_stage=3", "train.steps=2", still)
    saved = artifacts.committed(out)[-1]

    run = _resumed(_cfg(shards, out, "parallel.zero_stage=3", "train.steps=4"))  # 2 → 1
    _assert_state(full_state(run.engine.module, zero3=True), _exported(saved, "model"))
    _assert_state(run._ema_state(), _exported(saved, "ema"))
    del run
    # that ZeRO-3 engine left DeepSpeed's linear in torch.nn.functional; a ZeRO-0 run puts torch's back
    assert torch.nn.functional.linear is not torch._C._nn.linear
    TrainingRun(_cfg(shards, tmp_path / "zero0", "train.steps=1"), None)
    assert torch.nn.functional.linear is torch._C._nn.linear

    # 2 → 3, one step that leaves the EMA as it was (decay 1): the step's export gathers the new partitions
    output = _launch(
        3, shards, out, "parallel.zero_stage=3", "train.steps=3", "train.checkpoint_every=1",
        "train.ema_decay=1.0", still,
    )  # fmt: skip
    assert RESIZED.format(2, 3) in output and "universal checkpoint (ZeRO-3)" in output
    step3 = artifacts.committed(out)[-1]
    assert step3.name == "step_00000003" and len(_rank_files(step3)) == 3
    _assert_state(_exported(step3, "ema"), _exported(saved, "ema"))
    _assert_state(_exported(step3, "model"), _exported(saved, "model"), atol=1e-6)


@pytest.mark.parametrize(("zero", "how"), [(0, "as saved (nothing partitioned)"), (1, "(ZeRO-1)")])
def test_one_rank_resumes_on_two(shards, tmp_path, zero, how):
    out = tmp_path / "run"
    still = "train.warmup_steps=1000000"  # steps of ~1e-8, as above
    stage = f"parallel.zero_stage={zero}"
    train(_cfg(shards, out, "train.steps=2", still, stage), progress=False)
    saved = artifacts.committed(out)[-1]
    steps = ("train.steps=3", "train.checkpoint_every=1", "train.ema_decay=1.0", still, stage)
    output = _launch(2, shards, out, *steps)
    assert RESIZED.format(1, 2) in output and how in output
    step3 = artifacts.committed(out)[-1]
    assert step3.name == "step_00000003" and len(_rank_files(step3)) == 2
    _assert_state(_exported(step3, "ema"), _exported(saved, "ema"))
    _assert_state(_exported(step3, "model"), _exported(saved, "model"), atol=1e-6)


class _Planted:
    """Unpickled, it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_file_is_refused_by_the_conversion(shards, zero2_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(zero2_run, out)
    saved = artifacts.committed(out)[-1]
    marker = tmp_path / "planted-code-ran"
    target = saved / "ds" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    target.write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(ValueError, match="universal-checkpoint conversion failed") as err:
        _resumed(_cfg(shards, out, "parallel.zero_stage=2", "train.steps=4"))
    assert target.name in str(err.value) and "refused" in str(err.value)
    assert not marker.exists()
    assert not list((saved / "ds").glob("universal*"))  # nothing half-converted is left
