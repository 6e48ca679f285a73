"""The tiny captioned dataset the training tests share: 24 synthetic clips and stills as patch shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from configs import SynthConfig, load_config
from stages import artifacts
from stages.preprocess import run_preprocess
from stages.synth import run_synth
from tests import ROOT, without_rendezvous

GEOMETRY = ["data.frames=4", "data.height=8", "data.width=8", "data.fps=8", "model.patch_size=[1,4,4]"]
"""Clip geometry of the shards (and of every training config that reads them)."""


def make_training_shards(root: Path) -> Path:
    """Synthesize and preprocess into `root`; returns the shard directory."""
    synth = SynthConfig(count=24, frames=8, size=16, fps=8.0, seed=5, image_fraction=0.25)
    run_synth(root / "synth", synth, progress=False)
    cfg = load_config(
        overrides=[*GEOMETRY, f"preprocess.out={root / 'shards'}", "preprocess.files_per_shard=2"]
    )
    manifest = run_preprocess(cfg, [str(root / "synth")], progress=False)
    assert manifest["failed"] == 0, manifest
    return root / "shards"


def fixed_eval_loss(cfg, directory: Path | None) -> float:
    """v-loss of the initial weights (directory None: same seed, same init) or of a checkpoint's exported
    weights, on 8 fixed samples at fixed times and noise: a learning check free of batch noise."""
    from stages.shards.loader import loader_from_config
    from stages.train.trainer import DiffusionTrainer

    torch.manual_seed(cfg.train.seed)
    module = DiffusionTrainer(cfg).eval()
    if directory is not None:
        module.dit.load_state_dict(load_file(directory / "exported" / "model.safetensors"))
        module.text.load_state_dict(load_file(directory / "exported" / "model_text.safetensors"))
    batches = iter(loader_from_config(cfg, rank=0, world_size=1, train=False))
    batch = next(batches)
    while batch.kind != "video":
        batch = next(batches)
    x = batch.x
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(0.05, 0.95, x.shape[0])
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        loss = module(
            x, t, noise, captions=batch.captions, text=None, text_mask=None, fps=batch.fps,
            drop_text=torch.zeros(x.shape[0], dtype=torch.bool),
        )  # fmt: skip
    return loss.mean().item()


def kill_training_after_checkpoint(overrides: list[str], out: Path, checkpoint: int, final: int) -> None:
    """`pipeline train configs/tiny.yaml OVERRIDES` in a child process (this process's torch threads, so
    its losses match an in-process run), SIGKILLed with its process group once step `checkpoint` is
    committed in `out` and before step `final` is."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", "configs/tiny.yaml", *overrides, "--quiet"],
        cwd=ROOT,
        env={**without_rendezvous(), "OMP_NUM_THREADS": str(torch.get_num_threads())},
        start_new_session=True,
    )
    deadline, marker = time.monotonic() + 300, artifacts.step_dir(out, checkpoint) / artifacts.MARKER
    while not marker.exists() and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (artifacts.step_dir(out, final) / artifacts.MARKER).exists(), "the kill should land mid-run"
