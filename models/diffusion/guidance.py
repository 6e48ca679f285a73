"""Classifier-free guidance, Imagen Video's oscillating guidance weights, Imagen dynamic thresholding.

The model is an argument. Guidance assumes the model takes a boolean `drop_text` keyword of shape
(B,) and swaps in its null text embedding where it is True (the same switch used for condition
dropout in training), so one forward pass over a doubled batch yields both predictions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from models.diffusion.schedules import broadcast_like

GuidanceSchedule = Literal["constant", "oscillating"]


def _double(name: str, value: Any, batch: int) -> Any:
    """Concatenate a batch-major tensor with itself along dim 0; leave non-tensors and scalars alone."""
    if not isinstance(value, Tensor) or value.ndim == 0:
        return value
    if value.shape[0] != batch:
        raise ValueError(
            f"model keyword {name!r} has leading size {value.shape[0]}, expected the batch size {batch} "
            "(every tensor keyword is doubled along dim 0 for classifier-free guidance)"
        )
    return torch.cat([value, value], dim=0)


def classifier_free_guidance(
    model_fn: Callable[..., Tensor], x: Tensor, t: Tensor, scale: float | Tensor, **model_kwargs: Any
) -> Tensor:
    """Guided prediction uncond + scale·(cond - uncond) from one model call on a doubled batch.
    `scale` is one weight, or one per item (B,) (a guidance-distillation teacher's).

    The first half of the doubled batch keeps the text (drop_text False), the second half drops it
    (drop_text True). Linear in the model output, so it applies to v, eps or x0 predictions alike.
    scale = 1 is the plain conditional model and costs one undoubled call.
    """
    if "drop_text" in model_kwargs:
        raise ValueError("classifier_free_guidance sets drop_text itself; do not pass it in model_kwargs")
    batch = x.shape[0]
    if not isinstance(scale, Tensor) and scale == 1:
        drop = torch.zeros(batch, dtype=torch.bool, device=x.device)
        return model_fn(x, t, drop_text=drop, **model_kwargs)

    kwargs = {k: _double(k, v, batch) for k, v in model_kwargs.items()}
    drop = torch.cat(
        [
            torch.zeros(batch, dtype=torch.bool, device=x.device),
            torch.ones(batch, dtype=torch.bool, device=x.device),
        ]
    )  # (2B,)
    out = model_fn(torch.cat([x, x], dim=0), _double("t", t, batch), drop_text=drop, **kwargs)
    cond, uncond = out[:batch], out[batch:]
    if isinstance(scale, Tensor):
        scale = broadcast_like(scale.to(device=out.device, dtype=out.dtype), cond)
    return uncond + scale * (cond - uncond)


def guidance_scale_at(
    step_index: int,
    num_steps: int,
    scale: float,
    schedule: GuidanceSchedule = "constant",
    low: float = 1.0,
    oscillate_fraction: float = 0.5,
) -> float:
    """Guidance weight for sampling step `step_index` (0 = first, noisiest step) of `num_steps`.

    "constant": always `scale`.
    "oscillating": Imagen Video's schedule (Ho et al. 2022, sec. 2.6.2, "Large guidance weights").
    The paper applies a constant high weight for a number of initial sampling steps and then
    oscillates between a high and a low weight (e.g. 15 and 1) for the rest of sampling: the early
    high weight commits to the text, the low steps in the oscillation limit saturation artifacts.
    Here the first round((1 - oscillate_fraction)·num_steps) steps use `scale`; the remaining
    `oscillate_fraction` of the steps alternate by step index, `scale` on even indices and `low` on
    odd ones. oscillate_fraction = 1 oscillates from the start; 0 is the constant schedule. The paper
    only used it for the base and the low-resolution super-resolution models.
    """
    if schedule not in ("constant", "oscillating"):
        raise ValueError(f"unknown guidance schedule {schedule!r}; expected one of constant, oscillating")
    if num_steps < 1 or not 0 <= step_index < num_steps:
        raise ValueError(f"step_index must be in [0, {num_steps}), got {step_index}")
    if schedule == "constant":
        return float(scale)
    if not 0.0 <= oscillate_fraction <= 1.0:
        raise ValueError(f"oscillate_fraction must be in [0, 1], got {oscillate_fraction}")
    constant_steps = round((1.0 - oscillate_fraction) * num_steps)
    if step_index < constant_steps or step_index % 2 == 0:
        return float(scale)
    return float(low)


def _quantile_rows(values: Tensor, q: float) -> Tensor:
    """Per-row linear-interpolation quantile of a (B, N) tensor (torch.quantile's default method).

    Written with kthvalue because torch.quantile refuses inputs above 2^24 elements, which a single
    high-resolution video sample exceeds.
    """
    n = values.shape[1]
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    v_lo = values.kthvalue(lo + 1, dim=1).values
    if hi == lo:
        return v_lo
    v_hi = values.kthvalue(hi + 1, dim=1).values
    return v_lo + (pos - lo) * (v_hi - v_lo)


def dynamic_threshold(x0: Tensor, percentile: float = 0.995) -> Tensor:
    """Imagen dynamic thresholding (Saharia et al. 2022) of an x0 prediction.

    Per sample, s = max(quantile(|x0|, percentile), 1) over all non-batch elements; the prediction is
    clamped to [-s, s] and divided by s. Large guidance weights push x0 far outside the data range;
    this pulls saturated values back in (and is a no-op when |x0| stays within [-1, 1]).
    """
    if not 0.0 <= percentile <= 1.0:
        raise ValueError(f"percentile must be in [0, 1], got {percentile}")
    dtype = torch.promote_types(x0.dtype, torch.float32)
    flat = x0.to(dtype).flatten(1).abs()  # (B, N)
    s = _quantile_rows(flat, percentile).clamp(min=1.0)  # (B,)
    s = broadcast_like(s, x0)  # (B, 1, ..., 1)
    out = torch.maximum(torch.minimum(x0.to(dtype), s), -s) / s
    return out.to(x0.dtype)
