"""Sequence parallelism (parallel.sequence_parallel): a clip's tokens over 2 ranks give what one process
gives, for the model and for DeepSpeed at every ZeRO stage; a split training run learns and resumes
exactly after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from configs import load_config
from models.dit import VideoDiT
from stages import artifacts
from stages.train import train
from tests import ROOT, free_port, without_rendezvous
from tests.integration.training_data import GEOMETRY, fixed_eval_loss, make_training_shards

pytestmark = pytest.mark.integration

SCRIPT = "tests/integration/sequence_equivalence.py"


def _torchrun(n: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={n}",
        f"--master_port={free_port()}",
        *args,
    ]


def _env() -> dict[str, str]:
    """This environment less the rendezvous variables (in-process runs set some), one thread per rank."""
    return without_rendezvous() | {"OMP_NUM_THREADS": "1"}


def _run(n: int, *args: str) -> None:
    done = subprocess.run(
        _torchrun(n, *args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def _unwrapped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter names without the activation-checkpointing wrapper's segment."""
    return {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in state.items()}


def test_two_ranks_give_one_process_outputs_losses_and_gradients(tmp_path):
    out = tmp_path / "model.safetensors"
    _run(2, SCRIPT, str(out), "model")
    state = load_file(out)
    for kind in ("video", "images", "ssr"):
        whole = {
            k.removeprefix(f"{kind}.whole."): v for k, v in state.items() if k.startswith(f"{kind}.whole.")
        }
        split = {
            k.removeprefix(f"{kind}.split."): v for k, v in state.items() if k.startswith(f"{kind}.split.")
        }
        assert whole.keys() == split.keys(), kind
        grads = [k for k in whole if k.startswith("grad.")]
        assert len(grads) > 100, kind
        assert sum(int(whole[k].abs().sum() > 0) for k in grads) == len(grads), kind  # real gradients
        for key in whole:
            torch.testing.assert_close(split[key], whole[key], rtol=0, atol=1e-5, msg=f"{kind} {key}")


def test_one_process_two_and_dp2_by_sp2_give_the_same_step_at_every_zero_stage(tmp_path):
    """One DeepSpeed step of one 4-sample global batch: 1 process, 2 data-parallel processes (ZeRO-2),
    and 4 processes as dp 2 × sp 2 at ZeRO 0, 1, 2 and 3 (3c: with activation checkpointing)."""
    paths = {name: tmp_path / f"{name}.safetensors" for name in ("one", "dp2", "dp2sp2")}
    _run(1, SCRIPT, str(paths["one"]), "deepspeed", "1", "2")
    _run(2, SCRIPT, str(paths["dp2"]), "deepspeed", "1", "2")
    _run(4, SCRIPT, str(paths["dp2sp2"]), "deepspeed", "2", "0,1,2,3c")
    one, two = (
        {k.removeprefix("2."): v for k, v in load_file(paths[name]).items()} for name in ("one", "dp2")
    )
    assert one.keys() == two.keys() and len(one) > 100
    assert sum(int(v.abs().sum() > 0) for v in one.values()) > 100  # the gradients are real, not all zero
    torch.testing.assert_close(two.pop("loss"), one.pop("loss"), rtol=1e-6, atol=1e-6)
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-6, msg=f"dp2 {key}")
    state = _unwrapped(load_file(paths["dp2sp2"]))
    two["loss"] = load_file(paths["dp2"])["2.loss"]
    for stage in ("0", "1", "2", "3c"):
        ours = {k.removeprefix(f"{stage}."): v for k, v in state.items() if k.startswith(f"{stage}.")}
        assert ours.keys() == two.keys(), stage
        for key, value in two.items():
            torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-5, msg=f"ZeRO {stage} {key}")


# --------------------------------------------------------------------------------------------------
# A split training run
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_training_shards(tmp_path_factory.mktemp("sp-data"))


def _overrides(shards: Path, out: Path) -> list[str]:
    return [
        *GEOMETRY,  # T' = 4, S = 4 (packed images: 4 per item)
        f"data.shards={shards}",
        f"train.out_dir={out}",
        "data.batch_size=2",
        "data.image_fraction=0.25",
        "train.steps=24",
        "train.checkpoint_every=12",
        "train.log_every=1",
        "train.lr=5e-3",
        "train.warmup_steps=2",
        "train.ema_decay=0.9",
    ]


def _split_run(shards: Path, out: Path) -> subprocess.Popen:
    """`launch.sh train` of 2 processes, one sequence group, ZeRO-3."""
    args = [*_overrides(shards, out), "parallel.sequence_parallel=2", "parallel.zero_stage=3", "--quiet"]
    return subprocess.Popen(
        [str(ROOT / "launch.sh"), "train", "configs/tiny.yaml", *args],
        cwd=ROOT,
        env=_env() | {"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())},
        start_new_session=True,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in sorted(lines, key=lambda line: line["step"]) if "loss" in line]


def _exported(out: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(artifacts.step_dir(out, 24) / "exported" / f"{name}.safetensors")


def test_a_split_run_learns_like_one_process_and_resumes_exactly(shards, tmp_path, capsys):
    whole = train(
        load_config([ROOT / "configs/tiny.yaml"], _overrides(shards, tmp_path / "whole")), progress=False
    )
    proc = _split_run(shards, tmp_path / "split")
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    for line in (
        "1 data-parallel × 2 sequence-parallel",
        "ZeRO stage         3",
        "tokens per rank    8 per sample",
    ):
        assert line in output, output
    final = artifacts.step_dir(tmp_path / "split", 24)
    assert {p.name for p in final.glob("rank_*.pt")} == {"rank_00000.pt", "rank_00001.pt"}
    assert VideoDiT.from_pretrained(final / "exported", "ema.safetensors").config.depth == 2  # gathered
    split = _losses(tmp_path / "split")
    cfg = load_config([ROOT / "configs/tiny.yaml"], _overrides(shards, tmp_path / "split"))
    before, after = (
        fixed_eval_loss(cfg, None),
        fixed_eval_loss(cfg, artifacts.step_dir(cfg.train.out_dir, 24)),
    )
    assert len(split) == 24 and after < 0.85 * before, (before, after)  # it learns
    # one sequence group sees what one process sees: same batches, noise and (up to float order) losses
    assert split == pytest.approx(whole.losses, rel=1e-3), (split, whole.losses)

    out = tmp_path / "killed"
    proc = _split_run(shards, out)
    deadline = time.monotonic() + 300
    while not (artifacts.step_dir(out, 12) / artifacts.MARKER).exists() and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (artifacts.step_dir(out, 24) / artifacts.MARKER).exists(), "the kill should land mid-run"
    proc = _split_run(shards, out)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "resuming from" in output, output[-3000:]
    assert _losses(out) == split  # every step once, the uninterrupted run's exact values
    for name in ("model", "ema"):
        ref, got = _exported(tmp_path / "split", name), _exported(out, name)
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), name

    # the same checkpoint taken up by one process without the split (an elastic resume: layout 1×2 → 1×1)
    cfg = load_config(
        [ROOT / "configs/tiny.yaml"], [*_overrides(shards, tmp_path / "unsplit"), "parallel.zero_stage=3"]
    )
    result = train(cfg, resume=str(artifacts.step_dir(out, 12)), progress=False)
    assert result.step == 24 and len(result.losses) == 12 and all(loss == loss for loss in result.losses)
    assert "(data-parallel × sequence-parallel 1×2 to 1×1)" in capsys.readouterr().out


def test_bad_dims_fail_before_any_compute_naming_world_n_frames_and_positions(shards, tmp_path):
    cfg = load_config(
        [ROOT / "configs/tiny.yaml"], [*_overrides(shards, tmp_path / "run"), "parallel.sequence_parallel=2"]
    )
    with pytest.raises(ValueError, match=r"= 2 does not divide the world size 1 .*T' = 4, S = 4"):
        train(cfg, progress=False)  # one process cannot hold a group of 2
    assert not (tmp_path / "run").exists()
