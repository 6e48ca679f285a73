"""Super-resolution stages train with the same training stage: after a short CPU run on synthetic clips a
tiny SSR model beats bicubic upsampling and a tiny TSR model beats frame repetition in PSNR on held-out
clips (preprocessed like the training set, never trained on); SR previews and random crops work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from configs import SynthConfig, load_config
from models.dit import VideoDiT
from models.superres import degrade
from models.text import ByteTextEncoder
from stages.preprocess import run_preprocess
from stages.sampling import generate
from stages.shards.loader import loader_from_config
from stages.synth import run_synth
from stages.train import train

GEOMETRY = ["data.frames=4", "data.height=16", "data.width=16", "data.fps=8", "model.patch_size=[1,2,2]"]
STEPS = 600  # about 75 s per model on 2 cores; margins of 1.7–2.1 dB (see docs/TRAINING.md)


def _shards(root: Path, count: int, seed: int, image_fraction: float = 0.0) -> Path:
    synth = SynthConfig(count=count, frames=8, size=16, fps=8.0, seed=seed, image_fraction=image_fraction)
    run_synth(root / "synth", synth, progress=False)
    cfg = load_config(overrides=[*GEOMETRY, f"preprocess.out={root / 'out'}", "preprocess.files_per_shard=8"])
    assert run_preprocess(cfg, [str(root / "synth")], progress=False)["failed"] == 0
    return root / "out" / "shards"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sr-data")
    return _shards(root / "train", 96, seed=5), _shards(root / "held", 8, seed=77)


def _cfg(shards: Path, out: Path, kind: str, *extra: str):
    return load_config(
        overrides=[
            *GEOMETRY,
            "model.preset=tiny",
            f"model.kind={kind}",
            "model.sr_factor=2",
            "diffusion.prediction=x0",
            f"data.shards={shards}",
            "data.batch_size=8",
            "train.lr=1.5e-3",
            "train.warmup_steps=20",
            "train.ema_decay=0.99",
            f"train.out_dir={out}",
            *extra,
        ]
    )


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4.0 / ((a - b) ** 2).mean()))  # peak-to-peak 2 in [-1, 1]


@pytest.mark.slow  # 600 steps per model
@pytest.mark.parametrize("kind", ["ssr", "tsr"])
def test_super_resolution_beats_interpolation(data, tmp_path, kind):
    train_shards, held_shards = data
    cfg = _cfg(train_shards, tmp_path / kind, kind, f"train.steps={STEPS}", f"train.checkpoint_every={STEPS}")
    result = train(cfg, resume="none", progress=False)
    exported = result.checkpoint / "exported"
    model = VideoDiT.from_pretrained(exported, "ema.safetensors")
    text = ByteTextEncoder(dim=cfg.text.width, depth=cfg.text.depth, heads=cfg.text.heads, max_length=64)
    text.load_state_dict(load_file(exported / "ema_text.safetensors"))

    held = _cfg(held_shards, tmp_path / "held", kind, "data.batch_size=16")
    batch = next(iter(loader_from_config(held, 0, 1, train=False)))
    clips = batch.x  # (16, 3, 4, 16, 16) in [-1, 1]
    upsampled = degrade(clips, kind, 2)  # bicubic (ssr) or frame repetition (tsr) of the low-res input
    video = generate(
        model,
        text,
        list(batch.captions),
        frames=4,
        height=16,
        width=16,
        fps=8.0,
        diffusion=cfg.diffusion,
        seed=0,
        cond=upsampled,
        cond_aug=0.1,
        steps=10,
        guidance_scale=1.0,
    )
    model_psnr, baseline = _psnr(video, clips), _psnr(upsampled, clips)
    print(f"{kind}: model {model_psnr:.2f} dB, interpolation {baseline:.2f} dB")
    assert model_psnr > baseline + 0.5


def test_ssr_trains_on_crops_and_writes_previews(data, tmp_path):
    cfg = _cfg(
        data[0],
        tmp_path / "run",
        "ssr",
        "train.steps=2",
        "train.crop=[8,8]",
        "train.preview_every=2",
        "train.preview_steps=2",
        "data.batch_size=2",
    )
    result = train(cfg, resume="none", progress=False)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    out = tmp_path / "run" / "previews" / "step_00000002"
    # previews upsample full 16×16 training clips (trained on 8×8 crops): an mp4 per clip and a sheet
    assert sorted(p.name for p in out.glob("*.mp4")) == ["prompt_00.mp4", "prompt_01.mp4"]
    assert (out / "sheet.png").stat().st_size > 0


def test_image_ssr_trains_with_one_frame(tmp_path):
    """The image case: an SSR model trained on still images (T = 1, packed image batches)."""
    shards = _shards(tmp_path / "images", 6, seed=9, image_fraction=1.0)
    cfg = _cfg(
        shards,
        tmp_path / "run",
        "ssr",
        "data.frames=1",
        "data.image_fraction=1.0",
        "model.temporal_layers=false",
        "train.steps=2",
        "train.preview_every=2",
        "train.preview_steps=2",
        "data.batch_size=2",
    )
    result = train(cfg, resume="none", progress=False)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    model = VideoDiT.from_pretrained(result.checkpoint / "exported", "ema.safetensors")
    assert model.config.kind == "ssr" and not model.config.temporal_layers
    assert len(list((tmp_path / "run" / "previews" / "step_00000002").glob("*.mp4"))) == 2
