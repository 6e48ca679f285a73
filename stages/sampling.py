"""Text-to-video sampling from a trained `VideoDiT`: the one way to generate, for training previews and
cascade rendering alike.

`generate` encodes the prompts, draws noise, and runs the configured sampler with classifier-free
guidance (per-step weight from `guidance_scale_at`, optional dynamic thresholding). Each prompt owns a
CPU `torch.Generator` seeded from (seed, prompt key) and its own sampler instance: its starting noise,
any noise the sampler adds (DDPM, DDIM with eta > 0) and any multistep state come from that prompt alone,
so a prompt's video does not depend on which other prompts share its batch, nor on the device.
Only the model call is batched (the model sees every prompt of the batch at once). An image is a video
of one frame (`frames=1`).
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from configs.schema import DiffusionConfig
from models.diffusion import (
    CosineSchedule,
    Sampler,
    augment_condition,
    classifier_free_guidance,
    dynamic_threshold,
    gaussian_like,
    guidance_scale_at,
    make_sampler,
)
from models.dit import VideoDiT


def item_generator(seed: int, *key: int) -> torch.Generator:
    """The CPU generator for item `key` of a run seeded with `seed`: `item_generator(seed, i)` for prompt
    i, or a longer key such as (prompt, stage) in a cascade. Well-mixed, no collisions between nearby
    keys; note that `SeedSequence` pads keys shorter than four words with zeros, so (i,) and (i, 0)
    give the same generator: keys meant to differ should differ in a non-zero word."""
    state = np.random.SeedSequence([seed, *key]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(state))


def _strip_zeros(key: tuple[int, ...]) -> tuple[int, ...]:
    end = len(key)
    while end and key[end - 1] == 0:
        end -= 1
    return key[:end]


def _check_keys(item_keys: list[tuple[int, ...]], count: int) -> None:
    """Raise ValueError unless `item_keys` is one tuple of non-negative ints per prompt, all drawing
    different noise (keys equal up to trailing zeros share a generator, see `item_generator`)."""
    if len(item_keys) != count:
        raise ValueError(f"item_keys: expected one key per prompt ({count}), got {len(item_keys)}")
    for key in item_keys:
        if not isinstance(key, tuple) or not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in key
        ):
            raise ValueError(f"item_keys: each key must be a tuple of integers >= 0, got {key!r}")
    canonical = {_strip_zeros(key) for key in item_keys}
    if len(canonical) != len(item_keys):
        raise ValueError(f"item_keys: keys must be distinct (equal keys draw equal noise), got {item_keys}")


def _check_args(prompts: list[str], frames: int, height: int, width: int, fps: float, seed: int) -> None:
    """Raise ValueError naming the first bad argument and what was expected."""
    if isinstance(prompts, str) or len(prompts) == 0 or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of str, got {prompts!r}")
    for name, value in (("frames", frames), ("height", height), ("width", width), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
            raise ValueError(f"{name} must be an integer >= {0 if name == 'seed' else 1}, got {value!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps < 0:
        raise ValueError(f"fps must be a finite number >= 0 (0 marks still images), got {fps!r}")


def generate(
    model: VideoDiT,
    text_encoder: nn.Module,
    prompts: list[str],
    *,
    frames: int,
    height: int,
    width: int,
    fps: float,
    diffusion: DiffusionConfig,
    seed: int,
    cond: Tensor | None = None,
    cond_aug: float | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    item_keys: list[tuple[int, ...]] | None = None,
    progress: bool = False,
) -> Tensor:
    """Sample one (C, frames, height, width) video per prompt; returns float (B, C, T, H, W) in [-1, 1].

    Sampler, steps, eta, prediction, guidance weight and schedule, dynamic thresholding and the
    resolution shift of the noise schedule come from `diffusion`; `steps` and `guidance_scale` override
    the configured values. `fps` is the frame-rate conditioning (0 marks still images, as in training).
    Super-resolution models take `cond`, the previous stage's output brought to this stage's shape by
    `models.superres.upsample_video` (B, C, T, H, W), best already on the model's device: it is noised
    there (float32) to `cond_aug` (default `diffusion.cond_aug_level`) with each prompt's generator, the
    model denoises the residual over it (as in training, `stages.train.batches.sr_pair`), and the result is
    residual + cond.
    `item_keys` names each prompt's random stream, `item_generator(seed, *key)` (default: the prompt's
    position, `(i,)`); a cascade passes (prompt index, stage index) so each prompt's noise is the same
    whichever batch it is sampled in.
    Runs without gradients, with the model and text encoder in eval mode (their modes are restored).
    """
    _check_args(prompts, frames, height, width, fps, seed)
    if cond is None and cond_aug is not None:
        raise ValueError("cond_aug is set but cond is None: only super-resolution models take cond_aug")
    keys = [(i,) for i in range(len(prompts))] if item_keys is None else [tuple(k) for k in item_keys]
    _check_keys(keys, len(prompts))
    steps = diffusion.steps if steps is None else steps
    scale = diffusion.guidance_scale if guidance_scale is None else guidance_scale
    schedule = CosineSchedule.from_config(diffusion, numel=frames * height * width)
    thresholding = None
    if diffusion.dynamic_threshold > 0:
        thresholding = partial(dynamic_threshold, percentile=diffusion.dynamic_threshold)
    samplers = [
        make_sampler(diffusion.sampler, schedule, steps, diffusion.prediction, diffusion.eta, thresholding)
        for _ in prompts
    ]
    generators = [item_generator(seed, *key) for key in keys]
    weights = [
        guidance_scale_at(
            i,
            steps,
            scale,
            diffusion.guidance_schedule,
            diffusion.guidance_low,
            diffusion.guidance_oscillate_fraction,
        )
        for i in range(steps)
    ]
    _check_guidance_weights(model, weights)
    param = next(model.parameters())
    shape = (1, model.config.in_channels, frames, height, width)

    modes = [(m, m.training) for m in (model, text_encoder)]
    try:
        model.eval()
        text_encoder.eval()
        with torch.no_grad():
            level = diffusion.cond_aug_level if cond_aug is None else cond_aug
            noisy_cond = None if cond is None else _augment(cond.float(), level, schedule, generators)
            kwargs = _model_kwargs(text_encoder, prompts, fps, noisy_cond, level, param)
            noise = torch.cat([gaussian_like(torch.empty(shape), g) for g in generators])  # (B, C, T, H, W)
            video = _denoise(model, noise.to(param.device), samplers, generators, weights, kwargs, progress)
            if cond is not None:
                video = video + cond.to(video)  # the model samples the residual over the upsampled input
    finally:
        for module, mode in modes:
            module.train(mode)
    return video.clamp(-1.0, 1.0)


def _check_guidance_weights(model: VideoDiT, weights: list[float]) -> None:
    """A guidance-distilled model samples only at weights within the range it learned."""
    bounds = model.config.guidance_range
    outside = sorted({w for w in weights if bounds and not bounds[0] <= w <= bounds[1]})
    if outside:
        raise ValueError(
            f"guidance weight {outside[0]:g} is outside the range {list(bounds)} this guidance-distilled "
            "model learned (model.guidance_range); set guidance_scale (and guidance_low) within it"
        )


def _augment(
    cond: Tensor, level: float, schedule: CosineSchedule, generators: list[torch.Generator]
) -> Tensor:
    """Each item's conditioning noised to `level` with its own generator (drawn before its start noise)."""
    if cond.shape[0] != len(generators):
        raise ValueError(f"cond has {cond.shape[0]} videos for {len(generators)} prompts")
    return torch.cat([augment_condition(c[None], level, schedule, g) for c, g in zip(cond, generators)])


def _model_kwargs(
    text_encoder: nn.Module,
    prompts: list[str],
    fps: float,
    cond: Tensor | None,
    level: float,
    param: Tensor,
) -> dict[str, Tensor]:
    """The model's conditioning keywords for the batch, on the model's device (floats in its dtype)."""
    batch, device = len(prompts), param.device
    text = text_encoder(prompts).to(device)
    kwargs = {
        "text": text.tokens.to(param.dtype),  # (B, L, text_dim)
        "text_mask": text.mask,  # (B, L)
        "fps": torch.full((batch,), float(fps), device=device),  # (B,)
    }
    if cond is not None:
        kwargs["cond"] = cond.to(device=device, dtype=param.dtype)  # (B, C, T, H, W)
        kwargs["cond_aug"] = torch.full((batch,), float(level), device=device)  # (B,)
    return kwargs


def _denoise(
    model: VideoDiT,
    noise: Tensor,
    samplers: list[Sampler],
    generators: list[torch.Generator],
    weights: list[float],
    kwargs: dict[str, Tensor],
    progress: bool,
) -> Tensor:
    """Walk the sampler grid from `noise` (float32) with one guided, batched model call per step: a
    classifier-free-guided pair of passes, or one pass of a guidance-distilled model given the weight.

    Each item steps with its own sampler and generator, so its result never depends on its batch mates.
    """
    dtype = next(model.parameters()).dtype

    def model_fn(x: Tensor, t: Tensor, **kw: Tensor) -> Tensor:
        return model(x.to(dtype), t, **kw).float()

    x = noise
    times = samplers[0].timesteps.tolist()
    for i, t in enumerate(tqdm(times, desc="sampling", unit="step", disable=not progress)):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)  # (B,)
        if model.guidance_embed is not None:
            weight = torch.full_like(t_batch, weights[i])
            out = model_fn(x, t_batch, guidance=weight, **kwargs)  # (B, C, T, H, W)
        else:
            out = classifier_free_guidance(model_fn, x, t_batch, weights[i], **kwargs)
        steps = [
            sampler.step(out[b : b + 1], t, x[b : b + 1], generator=g)
            for b, (sampler, g) in enumerate(zip(samplers, generators))
        ]
        x = torch.cat(steps)  # (B, C, T, H, W)
    return x


def to_uint8(video: Tensor) -> np.ndarray:
    """(B, 3, T, H, W) in [-1, 1] → uint8 (B, T, H, W, 3), rounding (x + 1)·127.5 to the nearest integer.

    Values outside [-1, 1] are clamped first, so -1 maps to 0, 1 to 255 and 0 to 128 (127.5 rounds to even).
    """
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"to_uint8: expected a (B, 3, T, H, W) video tensor, got shape {tuple(video.shape)}")
    pixels = ((video.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 4, 1).cpu().numpy()  # (B, T, H, W, 3)
