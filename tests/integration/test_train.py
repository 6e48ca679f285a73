"""The training stage on CPU (gloo): multi-process ZeRO runs, 1 vs 2 processes, exact resume after a
kill, a crash during a save, non-finite steps, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from configs import load_config
from models.dit import VideoDiT
from stages import artifacts
from stages.train import NonFiniteError, checkpoint, train
from tests import ROOT, without_rendezvous
from tests.integration.training_data import (
    GEOMETRY,
    fixed_eval_loss,
    kill_training_after_checkpoint,
    make_training_shards,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_training_shards(tmp_path_factory.mktemp("train-data"))


def _overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        *GEOMETRY,
        f"data.shards={shards}",
        f"train.out_dir={out}",
        "data.batch_size=2",
        "train.log_every=1",
        "train.lr=3e-3",
        "train.warmup_steps=4",
        "train.ema_decay=0.9",
        "data.image_fraction=0.25",  # joint image-video batches
        *extra,
    ]


def _cfg(shards: Path, out: Path, *extra: str):
    return load_config([ROOT / "configs/tiny.yaml"], _overrides(shards, out, *extra))


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


def _weights(directory: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(directory / "exported" / f"{name}.safetensors")


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _launch(args: list[str], env: dict[str, str] | None = None, threads: int = 1, **kw) -> subprocess.Popen:
    """A child process with this test process's rendezvous variables removed (in-process runs set some).

    `threads` sets the child's OMP threads: float reductions, hence exact losses, depend on it, so a
    child that must match an in-process run uses this process's torch thread count.
    """
    base = without_rendezvous()
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env={**base, "OMP_NUM_THREADS": str(threads), **(env or {})},
        start_new_session=True,
        **kw,
    )


@pytest.mark.parametrize("zero", [2])  # ZeRO-3: the split run of test_sequence_parallel.py
def test_two_process_zero_run_learns(shards, tmp_path, zero):
    out = tmp_path / "run"
    args = _overrides(
        shards,
        out,
        f"parallel.zero_stage={zero}",
        "train.steps=60",
        "train.checkpoint_every=30",
        "train.lr=5e-3",
    )
    proc = _launch(
        [str(ROOT / "launch.sh"), "train", "configs/tiny.yaml", *args, "--quiet"],
        env={"NPROC_PER_NODE": "2", "MASTER_PORT": str(29600 + zero)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    assert "world size         2" in output and f"ZeRO stage         {zero}" in output
    losses = [v for _, v in sorted(_losses(out).items())]
    assert len(losses) == 60 and all(np.isfinite(losses))
    final = artifacts.committed(out)[-1]
    cfg = _cfg(shards, out)
    before, after = fixed_eval_loss(cfg, None), fixed_eval_loss(cfg, final)
    assert after < 0.85 * before, (before, after)  # deterministic: same batch, times and noise
    assert final.name == "step_00000060" and {p.name for p in final.glob("rank_*.pt")} == {
        "rank_00000.pt",
        "rank_00001.pt",
    }
    model = VideoDiT.from_pretrained(final / "exported", "ema.safetensors")  # loads for sampling
    assert sum(p.numel() for p in model.parameters()) > 0


LEAVE = """
import sys
import torch
import torch.distributed as dist
from stages.train import init_distributed, leave_distributed

rank, world, _ = init_distributed()
total = torch.ones(1)
dist.all_reduce(total)
sys.stdout.write(f"rank {rank} of {world} summed {total.item():.0f}. ")  # no newline: still buffered
code = leave_distributed(3 + rank)
print(f"rank {rank} returned {code}, group left: {not dist.is_initialized()}")
raise SystemExit(code)
"""


@pytest.mark.parametrize("n", [1, 2])
def test_a_rank_leaves_the_world_with_its_exit_code_and_its_output(tmp_path, n):
    """A gloo rank exits in `leave_distributed` (see there why) with the code it was given, and what it
    printed is not lost; a world of one destroys its group and returns."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVE)
    proc = _launch(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={29620 + n}",
         str(script)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, output[-3000:]  # every rank's code is non-zero
    for rank in range(n):
        assert f"rank {rank} of {n} summed {n}." in output, output[-3000:]
    if n == 1:
        assert "rank 0 returned 3, group left: True" in output, output[-3000:]
        assert "exitcode  : 3" in output, output[-3000:]
    else:
        assert "returned" not in output, output[-3000:]
        assert "exitcode  : 3" in output or "exitcode  : 4" in output, output[-3000:]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted 8-step single-process run with checkpoints every 4 steps."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = train(_cfg(shards, out, "train.steps=8", "train.checkpoint_every=4"), progress=False)
    assert result.step == 8 and result.skipped == 0
    return out, result


def test_kill_after_a_checkpoint_then_resume_reproduces_the_run(shards, tmp_path, reference):
    ref_out, ref = reference
    out = tmp_path / "run"
    overrides = _overrides(shards, out, "train.steps=8", "train.checkpoint_every=4")
    kill_training_after_checkpoint(overrides, out, 4, 8)

    result = train(_cfg(shards, out, "train.steps=8", "train.checkpoint_every=4"), progress=False)
    assert result.step == 8 and result.losses == ref.losses[4:]
    assert _losses(out) == _losses(ref_out)  # the metrics log has every step once, same values
    final, ref_final = artifacts.step_dir(out, 8), artifacts.step_dir(ref_out, 8)
    for name in ("model", "ema", "model_text", "ema_text"):
        assert _same_weights(_weights(final, name), _weights(ref_final, name)), name


def test_a_save_without_its_commit_marker_is_never_resumed_from(shards, tmp_path, reference):
    ref_out, _ = reference
    out = tmp_path / "run"
    train(_cfg(shards, out, "train.steps=8", "train.checkpoint_every=4"), progress=False)
    (artifacts.step_dir(out, 8) / artifacts.MARKER).unlink()  # as if the job died while saving step 8
    (artifacts.step_dir(out, 8) / "rank_00000.pt").write_bytes(b"torn")
    torn_log = out / "metrics.jsonl.tmp-4242-4243"  # a rewrite of the log killed halfway
    torn_log.write_text('{"step": 3, "lo')
    assert checkpoint.resolve_resume(out, "auto") == artifacts.step_dir(out, 4)
    with pytest.raises(ValueError, match="not a committed checkpoint"):
        checkpoint.resolve_resume(out, str(artifacts.step_dir(out, 8)))

    result = train(_cfg(shards, out, "train.steps=8", "train.checkpoint_every=4"), progress=False)
    assert result.step == 8 and (artifacts.step_dir(out, 8) / artifacts.MARKER).exists()
    assert not torn_log.exists()
    assert _same_weights(
        _weights(artifacts.step_dir(out, 8), "ema"), _weights(artifacts.step_dir(ref_out, 8), "ema")
    )


def test_only_the_last_committed_checkpoints_are_kept(shards, tmp_path):
    cfg = _cfg(
        shards, tmp_path / "run", "train.steps=5", "train.checkpoint_every=1", "train.keep_checkpoints=2"
    )
    train(cfg, progress=False)
    assert [d.name for d in artifacts.committed(tmp_path / "run")] == ["step_00000004", "step_00000005"]
    assert sorted(p.name for p in artifacts.checkpoint_root(tmp_path / "run").iterdir()) == [
        "step_00000004",
        "step_00000005",
    ]


def test_a_corrupt_committed_checkpoint_is_reported_not_replaced(shards, tmp_path, reference):
    ref_out, _ = reference
    out = tmp_path / "run"
    checkpoint_copy = artifacts.step_dir(out, 4)
    checkpoint_copy.parent.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(artifacts.step_dir(ref_out, 4)), str(checkpoint_copy)], check=True)
    (checkpoint_copy / "rank_00000.pt").unlink()
    with pytest.raises(ValueError, match=r"missing rank_00000\.pt; the checkpoint is corrupt"):
        train(_cfg(shards, out, "train.steps=8", "train.checkpoint_every=4"), progress=False)


def test_a_non_finite_step_is_skipped_and_leaves_the_weights_alone(shards, tmp_path):
    # warm-up covers every step, so the learning rate does not depend on train.steps
    common = ("train.warmup_steps=10", "train.checkpoint_every=100")
    skipped = train(
        _cfg(shards, tmp_path / "a", "train.steps=3", *common), progress=False, fault=lambda step: step == 2
    )
    assert skipped.skipped == 1 and np.isnan(skipped.losses[2]) and np.isfinite(skipped.losses[:2]).all()
    plain = train(_cfg(shards, tmp_path / "b", "train.steps=2", *common), progress=False)
    assert plain.losses == skipped.losses[:2]
    a, b = artifacts.step_dir(tmp_path / "a", 3), artifacts.step_dir(tmp_path / "b", 2)
    for name in ("model", "ema"):
        assert _same_weights(_weights(a, name), _weights(b, name)), name
    assert json.loads(_last_line(tmp_path / "a" / "metrics.jsonl"))["skipped_total"] == 1


def test_non_finite_steps_in_a_row_abort_without_a_checkpoint(shards, tmp_path):
    cfg = _cfg(
        shards, tmp_path / "run", "train.steps=10", "train.checkpoint_every=2", "train.max_bad_steps=3"
    )
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row"):
        train(cfg, progress=False, fault=lambda step: True)
    saved = artifacts.committed(tmp_path / "run")  # step 2 was reached (two skipped steps)
    assert [d.name for d in saved] == ["step_00000002"]
    assert all(torch.isfinite(v).all() for v in _weights(saved[0], "model").values())


def test_steps_settled_on_the_next_sync_match_steps_settled_at_once(shards, tmp_path, monkeypatch):
    """Under ZeRO-2 DeepSpeed reports the gradient norm as a device tensor, so a step between log lines
    is settled (skip or EMA update, metrics) on the next step's loss check instead of by its own read
    (stages/train/sync.py). Logging every 4 steps must then give exactly what logging every step (every
    step settled at once) gives: losses, skips, model and EMA weights and log values, also for a step
    whose gradient norm comes back infinite (injected at step 3; DeepSpeed applied that step)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    import stages.train.loop as train_module

    real_norm, real_nonfinite = DeepSpeedEngine.get_global_grad_norm, train_module.nonfinite

    def blown_up(engine):
        norm = real_norm(engine)
        assert isinstance(norm, torch.Tensor), "expected a device-tensor norm (the deferred path)"
        return torch.full_like(norm, float("inf")) if engine.global_steps == 3 else norm

    checks: list[int] = []

    def counted(values):
        checks.append(len(values))
        return real_nonfinite(values)

    monkeypatch.setattr(DeepSpeedEngine, "get_global_grad_norm", blown_up)
    monkeypatch.setattr(train_module, "nonfinite", counted)
    common = ("parallel.zero_stage=2", "train.steps=8", "train.checkpoint_every=100", "train.warmup_steps=10")
    runs = {}
    for every in (1, 4):
        checks.clear()
        out = tmp_path / f"every{every}"
        result = train(_cfg(shards, out, *common, f"train.log_every={every}"), progress=False)
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[every] = result, out, lines, list(checks)
    (at_once, out1, lines1, checks1), (deferred, out4, lines4, checks4) = runs[1], runs[4]
    # each loss check also carries the ranks' SIGTERM flag; then the checkpoint's weight check
    assert checks1 == [2] * 8 + [1]
    assert checks4 == [2, 3, 3, 3, 2, 3, 3, 3, 1]  # steps 4 and 8 are log lines: settled at once

    assert at_once.skipped == deferred.skipped == 1 and np.isnan(deferred.losses[2])
    assert np.array_equal(at_once.losses, deferred.losses, equal_nan=True)
    final1, final4 = artifacts.step_dir(out1, 8), artifacts.step_dir(out4, 8)
    for name in ("model", "ema", "model_text", "ema_text"):
        assert _same_weights(_weights(final1, name), _weights(final4, name)), name

    per_step = {line["step"]: line for line in lines1}
    assert [line["step"] for line in lines4] == [2, 3, 7]  # the skipped step, then every 4th

    def mean(key: str, steps: range) -> float:
        values = [per_step[s][key] for s in steps if s != 2]
        return sum(values) / len(values)

    skipped, single, last = lines4
    assert skipped["skipped_total"] == 1 and per_step[2]["skipped_total"] == 1
    assert (skipped["loss"], skipped["grad_norm"]) == (
        mean("loss", range(0, 2)),
        mean("grad_norm", range(0, 2)),
    )
    timing = {"time", "memory", "steps_per_s", "samples_per_s", "tokens_per_s", "data_wait_frac"}
    assert {k: v for k, v in single.items() if k not in timing} == {
        k: v for k, v in per_step[3].items() if k not in timing
    }
    assert (last["loss"], last["grad_norm"]) == (mean("loss", range(4, 8)), mean("grad_norm", range(4, 8)))
    assert last["lr"] == per_step[7]["lr"] and last["skipped_total"] == 1


def test_sigterm_checkpoints_and_exits_zero(shards, tmp_path):
    out = tmp_path / "run"
    args = _overrides(shards, out, "train.steps=100000", "train.checkpoint_every=100000")
    proc = _launch(
        [sys.executable, "-m", "pipeline", "train", "configs/tiny.yaml", *args, "--quiet"],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while len(_losses(out) if (out / "metrics.jsonl").exists() else {}) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    (saved,) = artifacts.committed(out)
    step = int(saved.name.removeprefix("step_"))
    assert step >= 3 and f"stopped by SIGTERM at step {step}" in err


def _last_line(path: Path) -> str:
    return path.read_text().splitlines()[-1]


def test_previews_from_the_ema_weights(shards, tmp_path):
    import av

    cfg = _cfg(
        shards, tmp_path / "run", "train.steps=2", "train.preview_every=2", "train.preview_steps=2",
        "train.checkpoint_every=100",
    )  # fmt: skip
    train(cfg, progress=False)
    out = tmp_path / "run" / "previews" / "step_00000002"
    prompts = list(cfg.train.preview_prompts)
    for i in range(len(prompts)):
        with av.open(str(out / f"prompt_{i:02d}.mp4")) as video:
            frames = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
        assert len(frames) == cfg.data.frames and frames[0].shape == (cfg.data.height, cfg.data.width, 3)
    from PIL import Image

    sheet = Image.open(out / "sheet.png")
    assert sheet.height > len(prompts) * cfg.data.height  # one row per prompt
