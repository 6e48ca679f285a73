"""The tiny captioned dataset the training tests share: 24 synthetic clips and stills as patch shards."""

from __future__ import annotations

from pathlib import Path

from configs import SynthConfig, load_config
from stages.preprocess import run_preprocess
from stages.synth import run_synth

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
