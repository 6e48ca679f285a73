"""Batches at a stage's training geometry (reduce, random crops) and super-resolution training pairs."""

from __future__ import annotations

import pytest
import torch

from configs import load_config
from models.diffusion import CosineSchedule
from models.superres import degrade, reduce_video
from stages.shards.loader import Batch
from stages.train.batches import fit_batch, sr_pair


def _batch(frames: int = 8, size: int = 16, kind: str = "video") -> Batch:
    x = torch.rand(3, 3, frames, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return Batch(
        x=x,
        kind=kind,
        captions=["a", "b", "c"],
        keys=["k0", "k1", "k2"],
        fps=torch.full((3,), 8.0),
        segments=None,
        text=None,
        text_mask=None,
        position={},
    )


def test_reduce_brings_clips_to_the_stage_geometry():
    cfg = load_config(overrides=["data.frames=4", "data.height=8", "data.width=8", "data.reduce=true"])
    batch = _batch()
    out = fit_batch(batch, cfg, torch.Generator())
    torch.testing.assert_close(out.x, reduce_video(batch.x, 4, 8, 8))
    torch.testing.assert_close(out.fps, torch.full((3,), 4.0))  # every 2nd frame: half the rate
    images = fit_batch(_batch(kind="images"), cfg, torch.Generator())  # packed images keep every image
    assert images.x.shape == (3, 3, 8, 8, 8)
    off = load_config(overrides=["data.frames=4", "data.height=8", "data.width=8"])
    assert fit_batch(batch, off, torch.Generator()).x is batch.x


def test_random_crops_are_windows_of_each_clip():
    cfg = load_config(overrides=["data.height=16", "data.width=16", "train.crop=[8,4]"])
    batch = _batch()
    out = fit_batch(batch, cfg, torch.Generator().manual_seed(1)).x
    assert out.shape == (3, 3, 8, 8, 4)
    for clip, crop in zip(batch.x, out):
        windows = [
            (y, x) for y in range(9) for x in range(13) if torch.equal(clip[..., y : y + 8, x : x + 4], crop)
        ]
        assert windows
    again = fit_batch(batch, cfg, torch.Generator().manual_seed(1)).x
    assert torch.equal(out, again)


@pytest.mark.parametrize("kind", ["ssr", "tsr"])
def test_sr_pair_is_residual_and_noised_upsampled_input(kind):
    cfg = load_config(overrides=[f"model.kind={kind}", "model.sr_factor=2", "diffusion.cond_aug_max=0.5"])
    schedule = CosineSchedule.from_config(cfg.diffusion, 8 * 16 * 16)
    x = _batch().x
    residual, cond, level = sr_pair(x, cfg, schedule, torch.Generator().manual_seed(2))
    up = degrade(x, kind, 2)
    torch.testing.assert_close(residual + up, x)
    assert level.shape == (3,) and bool(((level >= 0) & (level <= 0.5)).all())
    assert not torch.equal(cond, up)  # noised
    cfg.diffusion.cond_aug_max = 0.0
    _, clean, level = sr_pair(x, cfg, schedule, torch.Generator())
    assert torch.equal(clean, up) and bool((level == 0).all())


def test_invalid_super_resolution_configs_are_rejected():
    from configs import ConfigError

    with pytest.raises(ConfigError, match="sr_factor"):
        load_config(overrides=["model.kind=ssr", "model.sr_factor=1"])
    with pytest.raises(ConfigError, match=r"data\.frames=6 is not a multiple of model\.sr_factor=4"):
        load_config(overrides=["model.kind=tsr", "model.sr_factor=4", "data.frames=6"])
    with pytest.raises(ConfigError, match="videos only"):
        load_config(overrides=["model.kind=tsr", "data.image_fraction=0.5"])
    with pytest.raises(ConfigError, match=r"train\.crop"):
        load_config(overrides=["train.crop=[64,64]"])
    with pytest.raises(ConfigError, match=r"not divisible by model\.sr_factor=4"):
        load_config(
            overrides=["model.kind=ssr", "model.sr_factor=4", "train.crop=[6,8]", "model.patch_size=[1,2,2]"]
        )
