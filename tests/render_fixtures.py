"""Tiny "trained" cascade checkpoints for rendering tests, written by hand instead of by training.

A committed step directory holds what training writes (`stages.artifacts`): `config.yaml` (the full run
config), the EMA weights of the DiT and the byte text encoder exported beside it, and the `COMMITTED`
marker. The models are freshly initialised, except that the
zero-initialised output layers get small random weights, so outputs depend on every input (noise,
text, conditioning) as a trained model's would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from configs import dump_config, load_config
from models.dit import VideoDiT
from models.text import ByteTextEncoder
from stages.artifacts import MARKER, export_weights, step_dir

STEPS = 2
"""Sampler steps of every test stage."""

VIDEO_STAGES: list[dict[str, Any]] = [
    {"name": "base", "kind": "base", "frames": 4, "height": 16, "width": 16, "fps": 4.0},
    {"name": "tsr", "kind": "tsr", "frames": 8, "height": 16, "width": 16, "fps": 8.0},
    {"name": "ssr", "kind": "ssr", "frames": 8, "height": 32, "width": 32, "fps": 8.0},
]
"""base 4×16×16 @ 4 fps → tsr ×2 8×16×16 @ 8 fps → ssr ×2 8×32×32 @ 8 fps."""

IMAGE_STAGES: list[dict[str, Any]] = [
    {"name": "base", "kind": "base", "frames": 1, "height": 16, "width": 16, "fps": 0.0},
    {"name": "ssr", "kind": "ssr", "frames": 1, "height": 32, "width": 32, "fps": 0.0},
]
"""An image cascade: base 1×16×16 → ssr ×2 1×32×32 (fps 0)."""


def make_checkpoint(
    out_dir: Path,
    kind: str,
    sr_factor: int,
    frames: int,
    height: int,
    width: int,
    fps: float,
    seed: int = 0,
    temporal_layers: bool = True,
) -> Path:
    """Write a committed checkpoint under the training out_dir `out_dir`; returns out_dir."""
    cfg = load_config(
        [],
        [
            "model.preset=tiny",
            f"model.kind={kind}",
            f"model.sr_factor={sr_factor}",
            f"model.temporal_layers={str(temporal_layers).lower()}",
            "model.attention_backend=sdpa",
            f"data.frames={frames}",
            f"data.height={height}",
            f"data.width={width}",
            f"data.fps={fps if fps > 0 else 8.0}",
            f"train.out_dir={out_dir}",
        ],
    )
    step = step_dir(out_dir, 10)
    step.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, step / "config.yaml")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = VideoDiT(cfg.model)
    with torch.no_grad():
        for layer in (model.final_modulation, model.final):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.05)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.05)
    modules = {"dit": model, "text": ByteTextEncoder.from_config(cfg.text)}
    state = {f"{m}.{k}": v for m, module in modules.items() for k, v in module.state_dict().items()}
    export_weights(step, cfg, {"ema": state})
    (step / MARKER).write_text("10\n")
    return Path(out_dir)


def write_cascade(
    path: Path, stages: list[dict[str, Any]], checkpoints: list[Path | str], name: str = "test", **extra: Any
) -> Path:
    """A cascade YAML at `path` with the given stages (patch [1, 2, 2], STEPS ddim steps) and checkpoints."""
    rows = []
    for stage, checkpoint in zip(stages, checkpoints, strict=True):
        rows.append(
            {
                **stage,
                "checkpoint": str(checkpoint),
                "model": {"preset": "tiny", "patch_size": [1, 2, 2]},
                "sampler": "ddim",
                "steps": STEPS,
                "guidance_scale": 2.0,
                "cond_aug_level": 0.1 if stage["kind"] != "base" else 0.0,
                **extra,
            }
        )
    path.write_text(yaml.safe_dump({"name": name, "stages": rows}, sort_keys=False))
    return path


def build_cascade(root: Path, stages: list[dict[str, Any]], name: str = "test") -> Path:
    """Checkpoints for every stage under `root/ckpt/<stage>` plus `root/cascade.yaml`; returns the YAML."""
    checkpoints = []
    for i, stage in enumerate(stages):
        factor = 1
        if i > 0:
            prev = stages[i - 1]
            factor = (
                stage["frames"] // prev["frames"]
                if stage["kind"] == "tsr"
                else stage["height"] // prev["height"]
            )
        checkpoints.append(
            make_checkpoint(
                root / "ckpt" / stage["name"],
                stage["kind"],
                factor if factor > 1 else 2,
                stage["frames"],
                stage["height"],
                stage["width"],
                stage["fps"],
                seed=i,
                temporal_layers=stage["frames"] > 1,
            )
        )
    return write_cascade(root / "cascade.yaml", stages, checkpoints, name)
