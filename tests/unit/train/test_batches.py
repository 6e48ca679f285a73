"""Batches at a stage's training geometry (reduce, refusals without it, random crops) and
super-resolution training pairs."""

from __future__ import annotations

import json

import pytest
import torch

from configs import load_config
from models.diffusion import CosineSchedule
from models.superres import degrade, reduce_video
from stages.shards.loader import Batch
from stages.train.batches import check_shard_geometry, fit_batch, sr_pair


def _batch(frames: int = 8, size: int = 16, kind: str = "video") -> Batch:
    x = torch.rand(3, 3, frames, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    keys = [f"k{i}" for i in range(3)]
    if kind == "images":  # one key and caption per packed image
        keys = [[f"{key}_{j}" for j in range(frames)] for key in keys]
    return Batch(
        x=x,
        kind=kind,
        captions=[["a"] * frames for _ in keys] if kind == "images" else ["a", "b", "c"],
        keys=keys,
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
    off = load_config(overrides=["data.frames=8", "data.height=16", "data.width=16"])
    assert fit_batch(batch, off, torch.Generator()).x is batch.x  # already at the training geometry


def test_without_reduce_a_batch_of_another_geometry_is_refused_naming_both():
    cfg = load_config(overrides=["data.frames=4", "data.height=8", "data.width=8"])
    with pytest.raises(ValueError) as err:
        fit_batch(_batch(), cfg, torch.Generator())
    message = str(err.value)
    assert "sample k0 (a video clip) is 8×16×16" in message and "trains at 4×8×8" in message
    assert "data.reduce=true" in message and "data.frames/height/width" in message
    with pytest.raises(ValueError, match=r"sample k0_0 \(an image\) is 1×16×16"):
        fit_batch(_batch(kind="images"), cfg, torch.Generator())  # packed 16×16 images, 8×8 training


def test_without_reduce_images_and_buckets_are_at_the_training_geometry():
    images = _batch(frames=3, size=8, kind="images")  # three 8×8 images per item: any count is fine
    cfg = load_config(overrides=["data.frames=4", "data.height=8", "data.width=8"])
    assert fit_batch(images, cfg, torch.Generator()).x is images.x
    bucketed = load_config(
        overrides=[
            "data.frames=8", "data.height=8", "data.width=8", "preprocess.resize=bucket",
            "preprocess.buckets=[[16,16],[8,16]]",
        ]
    )  # fmt: skip
    assert fit_batch(_batch(), bucketed, torch.Generator()).x.shape == (3, 3, 8, 16, 16)
    with pytest.raises(ValueError, match=r"or one of preprocess\.buckets"):
        fit_batch(_batch(size=32), bucketed, torch.Generator())


def _manifest(folder, shapes: dict[str, int]):
    (folder / "shards").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"shapes": shapes}))
    return folder


@pytest.mark.parametrize("where", ["out", "out/shards"])
def test_shards_of_another_geometry_are_refused_from_their_manifest(tmp_path, where):
    out = _manifest(tmp_path / "out", {"1x8x8": 3, "4x8x8": 5})
    geometry = ["data.frames=4", "data.height=8", "data.width=8", f"data.shards={tmp_path / where}"]
    check_shard_geometry(load_config(overrides=geometry))  # videos and images at the training geometry
    (out / "manifest.json").write_text(json.dumps({"shapes": {"1x8x8": 3, "8x16x16": 5}}))
    with pytest.raises(ValueError) as err:
        check_shard_geometry(load_config(overrides=geometry))
    message = str(err.value)
    assert f"a sample shape in {out / 'manifest.json'} is 8×16×16" in message
    assert "trains at 4×8×8" in message and "data.reduce=true" in message
    check_shard_geometry(load_config(overrides=[*geometry, "data.reduce=true"]))  # reduce: no refusal


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
