"""Training that refuses instead of guessing and fails in one line: shards of another geometry, bad
checkpoint files on resume and render, a disk that fills during a checkpoint, and DeepSpeed op-build
locks that a killed build left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from configs import load_config
from pipeline.cli import main
from stages import artifacts
from stages.train import ops, train
from tests import ROOT, without_rendezvous
from tests.integration.training_data import GEOMETRY, make_training_shards
from tests.render_fixtures import IMAGE_STAGES, build_cascade


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_training_shards(tmp_path_factory.mktemp("train-data"))


def _args(shards: Path | str, out: Path, *extra: str) -> list[str]:
    return [
        "configs/tiny.yaml",
        *GEOMETRY,
        f"data.shards={shards}",
        f"train.out_dir={out}",
        "data.batch_size=2",
        "train.warmup_steps=2",
        "data.image_fraction=0.25",
        *extra,
    ]


def _train(*args: str) -> int:
    return main(["train", *args, "--quiet"])


def _metrics_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


# --------------------------------------------------------------------------------------------------
# Shards of another geometry
# --------------------------------------------------------------------------------------------------


def test_shards_of_another_geometry_are_refused_before_any_step(shards, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    smaller = ("data.frames=2", "data.height=4", "data.width=4", "train.steps=1")  # shards: 4×8×8
    patterns = {
        "directory": shards,  # has manifest.json: refused from it
        "brace pattern": f"{shards}/shards/train-{{000000..000011}}.tar",  # no manifest: the first batch
    }
    for name, source in patterns.items():
        out = tmp_path / name.replace(" ", "_")
        assert _train(*_args(source, out, *smaller)) == 2, name
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1, error
        assert re.search(r"is [14]×8×8 \(frames×height×width\), but the run trains at 2×4×4", error), error
        assert "data.reduce=true" in error and "data.frames/height/width" in error, error
        assert _metrics_lines(out) == 0 and not artifacts.committed(out), name
    reduced = tmp_path / "reduced"
    assert _train(*_args(shards, reduced, *smaller, "data.reduce=true")) == 0
    assert [d.name for d in artifacts.committed(reduced)] == ["step_00000001"]


# --------------------------------------------------------------------------------------------------
# DeepSpeed op builds and their locks
# --------------------------------------------------------------------------------------------------

DEEPSPEED_OPS = ("fused_adam", "cpu_adam", "deepspeed_shm_comm")
"""The build folders of every op a DeepSpeed training on CPU could build at run time."""


def test_stale_op_build_locks_do_not_hang_a_training(shards, tmp_path):
    """A build killed midway leaves `lock` in its folder; torch waits on it forever. On CPU training
    builds nothing, so such locks do not matter (on the code before, this run waited without end)."""
    extensions = tmp_path / "torch_extensions"
    for op in DEEPSPEED_OPS:
        (extensions / op).mkdir(parents=True)
        (extensions / op / "lock").touch()
    out = tmp_path / "run"
    env = without_rendezvous()
    env |= {"TORCH_EXTENSIONS_DIR": str(extensions), "OMP_NUM_THREADS": "1"}
    args = _args(shards, out, "train.steps=2", "train.checkpoint_every=2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", *args, "--quiet"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"training hung on the stale build locks:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    assert [d.name for d in artifacts.committed(out)] == ["step_00000002"]
    assert all((extensions / op / "lock").exists() for op in DEEPSPEED_OPS)  # nothing waited or built


def test_a_remaining_wait_on_a_build_lock_is_bounded_and_names_the_lock(tmp_path, capsys):
    lock = tmp_path / "fused_adam" / "lock"
    lock.parent.mkdir()
    lock.touch()
    started = time.monotonic()
    with pytest.raises(ValueError, match=rf"DeepSpeed op build lock {re.escape(str(lock))} has been held"):
        ops.wait_for_build_locks([lock], warn_after_s=0.2, give_up_after_s=1.0)
    assert time.monotonic() - started < 10
    assert f"waiting for {lock}" in capsys.readouterr().err
    lock.unlink()
    ops.wait_for_build_locks([lock], warn_after_s=0.0, give_up_after_s=0.0)  # no lock: no wait


@pytest.mark.slow  # loading the fused Adam op checks (and may redo) its build: minutes on 2 cores
def test_torch_adamw_trains_as_deepspeeds_fused_adam_and_resumes_its_checkpoints(shards, tmp_path):
    """CPU training uses torch's AdamW; DeepSpeed's fused Adam (where its build is ready) gives the same
    losses within float tolerance, and a fused-Adam checkpoint resumes under torch's AdamW as the fused
    run went on (before `ops.adopt_fused_adam_steps`, step 4's loss was 2.7 % off)."""
    from deepspeed.ops.op_builder.cpu import FusedAdamBuilder

    lock = ops.build_lock("FusedAdamBuilder")
    if not (lock.parent / f"{FusedAdamBuilder.NAME}.so").is_file() or lock.exists():
        pytest.skip(f"DeepSpeed's fused Adam is not built (or is being built) in {lock.parent}")
    fused_json = tmp_path / "fused.json"
    adamw = {"lr": 3e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8}
    fused_json.write_text(
        json.dumps({"optimizer": {"type": "AdamW", "params": {**adamw, "torch_adam": False}}})
    )
    common = ("train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5", "train.lr=3e-3")
    tiny = [ROOT / "configs/tiny.yaml"]
    torch_cfg = load_config(tiny, _args(shards, tmp_path / "a", *common)[1:])
    fused_cfg = load_config(
        tiny, _args(shards, tmp_path / "b", *common, f"parallel.deepspeed_config={fused_json}")[1:]
    )
    torch_run, fused_run = train(torch_cfg, progress=False), train(fused_cfg, progress=False)
    np.testing.assert_allclose(torch_run.losses, fused_run.losses, rtol=1e-4)
    # a checkpoint of a fused-Adam run (what CPU training used before) resumes under torch's AdamW
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    shutil.rmtree(artifacts.step_dir(tmp_path / "c", 4))
    resumed = train(load_config(tiny, _args(shards, tmp_path / "c", *common)[1:]), progress=False)
    np.testing.assert_allclose(resumed.losses, fused_run.losses[2:], rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Bad checkpoint files
# --------------------------------------------------------------------------------------------------


class _Planted:
    """A pickle that would create `path` if anything unpickled it without weights_only."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> Path:
    """A training out_dir with one committed checkpoint, at step 2."""
    out = tmp_path_factory.mktemp("trained")
    old = Path.cwd()
    os.chdir(ROOT)
    try:
        assert _train(*_args(shards, out, "train.steps=2", "train.checkpoint_every=2")) == 0
    finally:
        os.chdir(old)
    return out


def _damage(path: Path, how: str, planted: Path) -> None:
    import torch

    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(b"\x80\x02not a checkpoint" * 40)
    else:  # a file replaced by a pickle of something other than tensors
        torch.save({"module": _Planted(planted)}, path)


@pytest.mark.parametrize("how", ["truncated", "garbage", "planted"])
@pytest.mark.parametrize("name", ["rank_00000.pt", "ds/state/mp_rank_00_model_states.pt"])
def test_a_bad_checkpoint_file_is_one_line_naming_it_on_resume(
    shards, trained, tmp_path, capsys, monkeypatch, name, how
):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (step,) = artifacts.committed(out)
    planted = tmp_path / "pwned"
    _damage(step / name, how, planted)
    capsys.readouterr()
    assert _train(*_args(shards, out, "train.steps=3", "train.checkpoint_every=2")) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert error.startswith(f"error: {step / name}: "), error
    expected = "holds objects other than tensors and numbers, refused" if how == "planted" else "unreadable ("
    assert expected in error, error
    assert not planted.exists()
    assert _metrics_lines(out) == _metrics_lines(trained)  # no step ran


@pytest.mark.parametrize("how", ["truncated", "garbage", "planted"])
def test_a_bad_exported_weights_file_is_one_line_naming_it_on_render(tmp_path, capsys, how):
    cascade = build_cascade(tmp_path / "cascade", IMAGE_STAGES)
    weights = tmp_path / "cascade" / "ckpt" / "base" / "checkpoints" / "step_00000010" / "exported"
    planted = tmp_path / "pwned"
    _damage(weights / "ema.safetensors", how, planted)
    out = tmp_path / "renders"
    args = ["render", "--cascade", str(cascade), "--prompt", "a cat", "--out", str(out), "--local", "--quiet"]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert error.startswith(f"error: {weights / 'ema.safetensors'}: not a readable safetensors file"), error
    assert not planted.exists()


def test_exported_weights_of_another_shape_are_one_line_naming_the_file(tmp_path, capsys):
    cascade = build_cascade(tmp_path / "cascade", IMAGE_STAGES)
    ckpt = tmp_path / "cascade" / "ckpt"
    exported = [ckpt / stage / "checkpoints" / "step_00000010" / "exported" for stage in ("base", "ssr")]
    shutil.copy(exported[1] / "ema.safetensors", exported[0] / "ema.safetensors")  # SSR weights in base
    out = tmp_path / "renders"
    args = ["render", "--cascade", str(cascade), "--prompt", "a cat", "--out", str(out), "--local", "--quiet"]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert error.startswith(f"error: {exported[0] / 'ema.safetensors'}: weights do not match"), error


# --------------------------------------------------------------------------------------------------
# A disk that fills during a checkpoint
# --------------------------------------------------------------------------------------------------


def test_a_disk_that_fills_during_a_checkpoint_says_so_and_the_step_stays_uncommitted(
    shards, trained, small_disk, capsys, monkeypatch
):
    monkeypatch.chdir(ROOT)
    (step,) = artifacts.committed(trained)
    checkpoint_mb = sum(f.stat().st_size for f in step.rglob("*") if f.is_file()) / 2**20
    out = small_disk / "run"
    size = f"size={int(checkpoint_mb * 1.5 * 1024)}k"  # room for one checkpoint, not two
    subprocess.run(["mount", "-o", f"remount,{size}", str(small_disk)], check=True)
    args = _args(shards, out, "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5")
    assert _train(*args) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    partial = artifacts.step_dir(out, 4)
    assert error.startswith(f"error: no space left on device writing {partial}"), error
    assert "MB free)" in error and f"{partial.name} is left without its COMMITTED marker" in error, error
    assert [d.name for d in artifacts.committed(out)] == ["step_00000002"]
    assert partial.is_dir() and not (partial / artifacts.MARKER).exists()
    size = f"size={int(checkpoint_mb * 4 * 1024)}k"
    subprocess.run(["mount", "-o", f"remount,{size}", str(small_disk)], check=True)
    assert _train(*args) == 0  # with room again, it resumes from step 2 and commits step 4
    assert [d.name for d in artifacts.committed(out)] == ["step_00000002", "step_00000004"]
