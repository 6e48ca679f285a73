"""The video DiT: patches, images as single frames, packing, image→video loading, inputs, weights."""

from __future__ import annotations

import re

import pytest
import torch

from configs import model_config
from models.dit import VideoDiT
from models.layers import patchify, unpatchify
from models.positions import sincos_split, sincos_table

TEXT_LEN = 5


def _model(seed: int = 0, **overrides) -> VideoDiT:
    torch.manual_seed(seed)
    overrides.setdefault("attention_backend", "sdpa")
    model = VideoDiT(model_config("tiny", **overrides)).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # move off the zero init so every branch matters
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _inputs(batch=2, frames=4, size=8, seed=1, text_dim=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, frames, size, size, generator=g)
    t = torch.rand(batch, generator=g)
    text = torch.randn(batch, TEXT_LEN, text_dim, generator=g)
    mask = torch.ones(batch, TEXT_LEN, dtype=torch.bool)
    mask[0, 3:] = False
    fps = torch.full((batch,), 8.0)
    return x, t, text, mask, fps


# ---- patches -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 4, 2), (1, 1, 1), (4, 8, 8)])
def test_patchify_round_trip_is_bit_exact(patch):
    x = torch.randint(0, 256, (2, 3, 8, 16, 24), dtype=torch.uint8)
    tokens = patchify(x, patch)
    grid = (8 // patch[0], 16 // patch[1], 24 // patch[2])
    assert tokens.shape == (2, grid[0] * grid[1] * grid[2], patch[0] * patch[1] * patch[2] * 3)
    assert torch.equal(unpatchify(tokens, grid, patch), x)
    xf = torch.randn(1, 3, 8, 16, 24)
    assert torch.equal(unpatchify(patchify(xf, patch), grid, patch), xf)


def test_patch_token_holds_its_block():
    patch = (2, 4, 2)
    x = torch.randn(1, 3, 4, 8, 6)
    tokens = patchify(x, patch)  # grid (2, 2, 3)
    t, h, w = 1, 0, 2
    index = (t * 2 + h) * 3 + w
    block = x[0, :, 2 * t : 2 * t + 2, 4 * h : 4 * h + 4, 2 * w : 2 * w + 2]  # (C, pt, ph, pw)
    assert torch.equal(tokens[0, index], block.permute(1, 2, 3, 0).reshape(-1))


# ---- basic behaviour ---------------------------------------------------------------------------------


def test_zero_init_outputs_zero_and_same_seed_same_output():
    torch.manual_seed(3)
    fresh = VideoDiT(model_config("tiny"))
    x, t, text, mask, fps = _inputs()
    assert torch.count_nonzero(fresh(x, t, text=text, text_mask=mask, fps=fps)) == 0  # adaLN-Zero
    a, b = _model(seed=7), _model(seed=7)
    out_a = a(x, t, text=text, text_mask=mask, fps=fps)
    assert torch.equal(out_a, b(x, t, text=text, text_mask=mask, fps=fps))
    assert not torch.equal(out_a, _model(seed=8)(x, t, text=text, text_mask=mask, fps=fps))


@pytest.mark.parametrize("kind", ["base", "ssr"])
def test_gradients_reach_every_parameter(kind):
    model = _model(kind=kind).train()
    x, t, text, mask, fps = _inputs()
    kwargs = {"cond": torch.randn_like(x), "cond_aug": torch.rand(2)} if kind != "base" else {}
    drop = torch.tensor([True, False])
    out = model(x, t, text=text, text_mask=mask, fps=fps, drop_text=drop, **kwargs)
    out.pow(2).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert dead == []


def test_runs_on_other_grids_than_trained():
    model = _model()
    for frames, height, width in [(1, 8, 8), (6, 16, 8), (3, 4, 12)]:
        x = torch.randn(1, 3, frames, height, width)
        out = model(x, torch.rand(1), text=torch.randn(1, 2, 64))
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_dropped_text_ignores_the_text():
    model = _model()
    x, t, text, mask, fps = _inputs()
    other = torch.randn_like(text)
    drop = torch.tensor([True, False])
    a = model(x, t, text=text, text_mask=mask, fps=fps, drop_text=drop)
    b = model(x, t, text=other, text_mask=mask, fps=fps, drop_text=drop)
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[1], b[1], atol=1e-4)


def test_padded_text_tokens_do_not_matter():
    model = _model()
    x, t, text, mask, fps = _inputs()
    changed = text.clone()
    changed[0, 3:] = 50.0
    torch.testing.assert_close(
        model(x, t, text=text, text_mask=mask, fps=fps), model(x, t, text=changed, text_mask=mask, fps=fps)
    )


# ---- positions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [8, 64, 1152])
def test_sincos_gives_frame_row_and_column_their_own_channels(dim):
    frames, rows, cols = sincos_split(dim)
    assert frames + rows + cols == dim and frames % 2 == rows % 2 == cols % 2 == 0
    height, width, tp = 3, 4, 5
    table = sincos_table(torch.arange(tp)[None], height, width, dim)[0]  # (T'·S, D)
    grid = table.view(tp, height, width, dim)
    time_part, row_part, col_part = grid.split([frames, rows, cols], dim=-1)
    # each part depends on its own axis only...
    assert torch.equal(time_part, time_part[:, :1, :1].expand_as(time_part))
    assert torch.equal(row_part, row_part[:1, :, :1].expand_as(row_part))
    assert torch.equal(col_part, col_part[:1, :1, :].expand_as(col_part))
    # ...and tells every index of it apart
    for part, axis in ((time_part[:, 0, 0], tp), (row_part[0, :, 0], height), (col_part[0, 0, :], width)):
        assert torch.cdist(part, part).add(torch.eye(axis) * 1e9).min() > 1e-3


# ---- images as single frames, packing -----------------------------------------------------------------


@pytest.mark.parametrize("pos_embed", ["rope", "sincos"])
def test_packed_images_equal_images_alone(pos_embed):
    model = _model(pos_embed=pos_embed)
    n = 3
    x, t, text, mask, _ = _inputs(batch=n, frames=1)
    fps = torch.zeros(n)
    alone = model(x, t, text=text, text_mask=mask, fps=fps)  # T = 1: temporal attention bypassed
    packed_x = x.permute(2, 1, 0, 3, 4)  # (1, C, n, H, W): images along the frame axis
    packed = model(
        packed_x,
        t[None],
        text=text[None],
        text_mask=mask[None],
        fps=fps[None],
        segments=torch.arange(n)[None],
    )
    torch.testing.assert_close(packed.permute(2, 1, 0, 3, 4), alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos_embed", ["rope", "sincos"])
def test_packed_clips_equal_clips_alone(pos_embed):
    model = _model(pos_embed=pos_embed)
    x, t, text, mask, fps = _inputs(batch=2, frames=3)
    alone = model(x, t, text=text, text_mask=mask, fps=fps)
    packed_x = torch.cat([x[0], x[1]], dim=1)[None]  # (1, C, 6, H, W)
    per_frame = lambda v: v.repeat_interleave(3, dim=0)[None]  # noqa: E731
    packed = model(
        packed_x,
        per_frame(t),
        text=per_frame(text),
        text_mask=per_frame(mask),
        fps=per_frame(fps),
        segments=torch.tensor([[0, 0, 0, 1, 1, 1]]),
    )
    torch.testing.assert_close(packed[0, :, :3], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, :, 3:], alone[1], atol=1e-5, rtol=1e-5)


def test_image_model_loads_into_video_model(tmp_path):
    image_model = _model(temporal_layers=False)
    image_model.save_pretrained(tmp_path / "image")
    video_model = VideoDiT.from_pretrained(tmp_path / "image", overrides=("temporal_layers=true",)).eval()
    assert video_model.config.temporal_layers and any(
        "temporal_attn" in n for n, _ in video_model.named_parameters()
    )
    x, t, text, mask, fps = _inputs(frames=1)
    torch.testing.assert_close(
        video_model(x, t, text=text, text_mask=mask, fps=fps),
        image_model(x, t, text=text, text_mask=mask, fps=fps),
        atol=0,
        rtol=0,
    )
    # zero-initialised temporal output: multi-frame input equals the image model frame by frame
    xv, tv, textv, maskv, fpsv = _inputs(frames=4)
    torch.testing.assert_close(
        video_model(xv, tv, text=textv, text_mask=maskv, fps=fpsv),
        image_model(xv, tv, text=textv, text_mask=maskv, fps=fpsv),
        atol=1e-6,
        rtol=1e-6,
    )


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = _model(kind="tsr")
    path = model.save_pretrained(tmp_path)
    assert path.name == "model.safetensors" and (tmp_path / "config.yaml").is_file()
    loaded = VideoDiT.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    x, t, text, mask, fps = _inputs()
    kwargs = {"cond": torch.randn_like(x), "cond_aug": torch.rand(2)}
    torch.testing.assert_close(
        loaded(x, t, text=text, text_mask=mask, fps=fps, **kwargs),
        model(x, t, text=text, text_mask=mask, fps=fps, **kwargs),
        atol=0,
        rtol=0,
    )
    with pytest.raises(FileNotFoundError, match=r"config\.yaml"):
        VideoDiT.from_pretrained(tmp_path / "missing")
    other = _model(width=32, heads=2)
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.yaml").write_text((tmp_path / "config.yaml").read_text())
    weights = re.escape(str(tmp_path / "other" / "model.safetensors"))
    with pytest.raises(ValueError, match=f"^{weights}: weights do not match .*size mismatch for patch_embed"):
        VideoDiT.from_pretrained(tmp_path / "other")


# ---- bad input -----------------------------------------------------------------------------------------


def test_bad_inputs_raise_before_compute():
    model = _model()
    x, t, text, _, _ = _inputs()
    with pytest.raises(ValueError, match=r"5-D tensor \(B, C, T, H, W\), got shape \(3, 4, 8, 8\)"):
        model(x[0], t, text=text)
    with pytest.raises(ValueError, match=r"expected 3 channels .* got shape \(2, 4, 4, 8, 8\)"):
        model(torch.randn(2, 4, 4, 8, 8), t, text=text)
    with pytest.raises(ValueError, match=r"\(4, 7, 8\) is not divisible by the patch size \(1, 2, 2\)"):
        model(torch.randn(2, 3, 4, 7, 8), t, text=text)
    with pytest.raises(ValueError, match="text: expected embedding width 64"):
        model(x, t, text=torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match=r"t: expected shape \(2,\) or \(2, 4\)"):
        model(x, torch.rand(3), text=text)
    with pytest.raises(ValueError, match="needs cond"):
        _model(kind="ssr")(x, t, text=text)
    with pytest.raises(ValueError, match="patch_size"):
        _model(patch_size=[2, 2, 2])(x, torch.rand(2, 4), text=text)


def test_byte_text_encoder_feeds_the_model_and_trains_jointly():
    from models.text import ByteTextEncoder

    torch.manual_seed(0)
    encoder = ByteTextEncoder(dim=64, depth=1, heads=4, max_length=32)
    model = _model()
    emb = encoder(["a red ball rolls", "snow"])
    x = torch.randn(2, 3, 2, 8, 8)
    out = model(x, torch.rand(2), text=emb.tokens, text_mask=emb.mask)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.any(p.grad != 0) for p in encoder.parameters() if p.requires_grad)
