"""Sampling: output shape and range, seed determinism, batch independence per prompt, guidance against a
hand-written two-step DDIM reference, super-resolution conditioning, model modes, uint8 conversion."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from configs import DiffusionConfig, model_config
from models.diffusion import CosineSchedule, augment_condition
from models.dit import VideoDiT
from models.text import ByteTextEncoder
from stages.sampling import generate, item_generator, to_uint8

FRAMES, SIZE = 2, 8
PROMPTS = ["a red square moving left", "blue", "a yellow triangle"]


def _model(kind: str = "base") -> VideoDiT:
    torch.manual_seed(0)
    model = VideoDiT(model_config("tiny", attention_backend="sdpa", kind=kind))
    g = torch.Generator().manual_seed(100)
    with torch.no_grad():  # move off the zero init so the text and every branch matter
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def model() -> VideoDiT:
    return _model()


@pytest.fixture(scope="module")
def encoder() -> ByteTextEncoder:
    torch.manual_seed(1)
    return ByteTextEncoder(dim=64, depth=1, heads=4, max_length=32)  # dim = the tiny model's text_dim


def _generate(model, encoder, prompts, **overrides):
    diffusion = overrides.pop("diffusion", DiffusionConfig(steps=3, guidance_scale=3.0))
    args = {"frames": FRAMES, "height": SIZE, "width": SIZE, "fps": 8.0, "seed": 0, **overrides}
    return generate(model, encoder, prompts, diffusion=diffusion, **args)


# ---------------------------------------------------------------------------------------------------------
# Shape, range, determinism
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, FRAMES])
def test_shape_dtype_and_range(model, encoder, frames):
    video = _generate(model, encoder, PROMPTS[:2], frames=frames, fps=0.0 if frames == 1 else 8.0)
    assert video.shape == (2, 3, frames, SIZE, SIZE) and video.dtype == torch.float32
    assert video.abs().max() <= 1.0 and video.std() > 0.05
    assert not torch.equal(video[0], video[1])


def test_same_seed_same_output_other_seed_differs(model, encoder):
    a = _generate(model, encoder, PROMPTS[:2], seed=5)
    assert torch.equal(a, _generate(model, encoder, PROMPTS[:2], seed=5))
    assert not torch.equal(a, _generate(model, encoder, PROMPTS[:2], seed=6))


@pytest.mark.parametrize(
    "diffusion",
    [
        DiffusionConfig(sampler="ddim", steps=3, guidance_scale=3.0),
        DiffusionConfig(sampler="ddim", steps=3, eta=1.0, guidance_scale=3.0, dynamic_threshold=0.9),
        DiffusionConfig(sampler="ddpm", steps=3, guidance_scale=1.0),
        DiffusionConfig(sampler="dpmpp_2m", steps=3, guidance_scale=3.0, guidance_schedule="oscillating"),
    ],
    ids=["ddim", "ddim-eta1-threshold", "ddpm-unguided", "dpmpp-oscillating"],
)
def test_prompt_output_does_not_depend_on_batch_mates(model, encoder, diffusion):
    batch = _generate(model, encoder, PROMPTS, diffusion=diffusion)
    alone = _generate(model, encoder, PROMPTS[:1], diffusion=diffusion)
    other_mates = _generate(
        model, encoder, ["x", PROMPTS[1], "a much longer prompt than any other"], diffusion=diffusion
    )
    # equal up to float rounding of differently sized matmuls (text padding, batch size)
    torch.testing.assert_close(alone[0], batch[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(other_mates[1], batch[1], rtol=0, atol=1e-5)
    assert (batch[0] - batch[1]).abs().max() > 0.1  # and prompts do differ


def test_item_generators_differ_by_seed_and_index():
    draws = {(s, i): torch.randn(4, generator=item_generator(s, i)) for s in (0, 1) for i in (0, 1)}
    values = list(draws.values())
    assert all(not torch.equal(a, b) for k, a in enumerate(values) for b in values[k + 1 :])
    assert torch.equal(draws[(1, 0)], torch.randn(4, generator=item_generator(1, 0)))


# ---------------------------------------------------------------------------------------------------------
# Guidance against an independent reference
# ---------------------------------------------------------------------------------------------------------


def _alpha_sigma(t: float, shift: float) -> tuple[float, float]:
    """The cosine schedule written out: logsnr(t) = -2·log(tan(a·t + b)) + shift over [-15, 15]."""
    b = math.atan(math.exp(-7.5))
    a = math.atan(math.exp(7.5)) - b
    logsnr = -2 * math.log(math.tan(a * t + b)) + shift
    return math.sqrt(1 / (1 + math.exp(-logsnr))), math.sqrt(1 / (1 + math.exp(logsnr)))


def test_guidance_matches_hand_written_two_step_ddim(model, encoder):
    prompts = PROMPTS[:2]
    numel = FRAMES * SIZE * SIZE
    diffusion = DiffusionConfig(
        sampler="ddim",
        steps=2,
        guidance_scale=3.0,
        guidance_schedule="oscillating",  # weights: 3 at step 0, guidance_low at step 1
        guidance_oscillate_fraction=1.0,
        guidance_low=0.5,
        shift_reference_numel=4 * numel,
    )
    video = _generate(model, encoder, prompts, diffusion=diffusion)

    shift = math.log(4)
    with torch.no_grad():
        text = encoder(prompts)
        fps = torch.full((2,), 8.0)
        x = torch.cat(
            [torch.randn(1, 3, FRAMES, SIZE, SIZE, generator=item_generator(0, i)) for i in range(2)]
        )
        for t, s, weight in [(1.0, 0.5, 3.0), (0.5, 0.0, 0.5)]:
            tt = torch.full((2,), t)
            kw = {"text": text.tokens, "text_mask": text.mask, "fps": fps}
            cond = model(x, tt, drop_text=torch.zeros(2, dtype=torch.bool), **kw)
            uncond = model(x, tt, drop_text=torch.ones(2, dtype=torch.bool), **kw)
            v = uncond + weight * (cond - uncond)
            alpha, sigma = _alpha_sigma(t, shift)
            x0, eps = alpha * x - sigma * v, sigma * x + alpha * v  # v-prediction, alpha² + sigma² = 1
            if s == 0.0:
                x = x0
            else:
                alpha_s, sigma_s = _alpha_sigma(s, shift)
                x = alpha_s * x0 + sigma_s * eps  # deterministic DDIM
    torch.testing.assert_close(video, x.clamp(-1, 1), rtol=1e-5, atol=1e-5)

    unguided = _generate(model, encoder, prompts, diffusion=DiffusionConfig(steps=2, guidance_scale=1.0))
    assert (unguided - video).abs().max() > 0.05


# ---------------------------------------------------------------------------------------------------------
# Super-resolution conditioning, modes, overrides
# ---------------------------------------------------------------------------------------------------------


def test_super_resolution_model_uses_cond_and_level(encoder):
    sr = _model("ssr")
    cond = torch.rand(2, 3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    base = _generate(sr, encoder, PROMPTS[:2], cond=cond, cond_aug=0.1)
    assert base.shape == (2, 3, FRAMES, SIZE, SIZE)
    assert not torch.equal(base, _generate(sr, encoder, PROMPTS[:2], cond=-cond, cond_aug=0.1))
    assert not torch.equal(base, _generate(sr, encoder, PROMPTS[:2], cond=cond, cond_aug=0.6))
    # cond_aug defaults to the configured sampling level
    default = DiffusionConfig(steps=3, guidance_scale=3.0, cond_aug_level=0.1)
    assert torch.equal(base, _generate(sr, encoder, PROMPTS[:2], cond=cond, diffusion=default))
    with pytest.raises(ValueError, match="cond"):
        _generate(sr, encoder, PROMPTS[:2])
    with pytest.raises(ValueError, match="cond_aug"):
        _generate(sr, encoder, PROMPTS[:2], cond_aug=0.1)


def test_super_resolution_samples_the_residual_over_the_noised_cond(encoder):
    """A fresh SR model (zero-initialised output) predicting x0 predicts a zero residual, so the video is
    the upsampled input itself; the model sees that input noised to the level with the prompt's own
    generator, drawn before its starting noise."""
    torch.manual_seed(0)
    sr = VideoDiT(model_config("tiny", attention_backend="sdpa", kind="ssr"))
    cond = torch.rand(2, 3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    seen = []
    sr.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["cond"].clone()), with_kwargs=True)
    diffusion = DiffusionConfig(steps=2, guidance_scale=1.0, prediction="x0")
    video = _generate(sr, encoder, PROMPTS[:2], cond=cond, cond_aug=0.3, diffusion=diffusion, seed=4)
    torch.testing.assert_close(video, cond)
    schedule = CosineSchedule.from_config(diffusion, FRAMES * SIZE * SIZE)
    for i in range(2):
        expected = augment_condition(cond[i : i + 1], 0.3, schedule, item_generator(4, i))
        torch.testing.assert_close(seen[0][i : i + 1], expected)


def test_modes_restored_and_no_gradients(model, encoder):
    model.train()
    encoder.train()
    try:
        video = _generate(model, encoder, PROMPTS[:1])
        assert model.training and encoder.training and not video.requires_grad
    finally:
        model.eval()
        encoder.eval()
    assert torch.equal(video, _generate(model, encoder, PROMPTS[:1]))


def test_steps_and_guidance_overrides(model, encoder):
    cfg = DiffusionConfig(steps=3, guidance_scale=3.0)
    a = _generate(model, encoder, PROMPTS[:1], diffusion=cfg, steps=2, guidance_scale=1.0)
    b = _generate(model, encoder, PROMPTS[:1], diffusion=DiffusionConfig(steps=2, guidance_scale=1.0))
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(model, encoder):
    # noise comes from CPU generators, so the device changes only float rounding
    cpu = _generate(model, encoder, PROMPTS[:2])
    cuda = _generate(copy.deepcopy(model).cuda(), copy.deepcopy(encoder).cuda(), PROMPTS[:2])
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"frames": 0}, "frames"), ({"height": 2.5}, "height"), ({"fps": -1.0}, "fps"), ({"seed": -1}, "seed")],
)
def test_argument_errors_name_the_argument(model, encoder, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        _generate(model, encoder, PROMPTS[:1], **kwargs)
    with pytest.raises(ValueError, match="prompts"):
        _generate(model, encoder, "a bare string")


# ---------------------------------------------------------------------------------------------------------
# to_uint8
# ---------------------------------------------------------------------------------------------------------


def test_to_uint8_rounds_clamps_and_moves_channels_last():
    values = [-1.0, 1.0, 0.0, -2.0, 2.0, 10.4 / 127.5 - 1, 10.6 / 127.5 - 1, 254.4 / 127.5 - 1]
    video = torch.zeros(1, 3, 1, 1, len(values))
    video[0, 0, 0, 0] = torch.tensor(values)
    video[0, 1] = 1.0  # green channel full
    out = to_uint8(video)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 1, len(values), 3)
    assert out[0, 0, 0, :, 0].tolist() == [0, 255, 128, 0, 255, 10, 11, 254]
    assert (out[..., 1] == 255).all() and (out[..., 2] == 128).all()
    with pytest.raises(ValueError, match="B, 3, T, H, W"):
        to_uint8(torch.zeros(3, 2, 4, 4))
