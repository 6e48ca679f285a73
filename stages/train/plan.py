"""What a run will do per step, computed from the config alone: the plan printed before training."""

from __future__ import annotations

import math
from typing import Any

from configs import RunConfig
from models.flops import forward_flops, parameter_count, token_grid
from stages.tables import key_value_table


def training_plan(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """What a run will do per step, computed from the config alone (the plan printed before training)."""
    data, parallel = cfg.data, cfg.parallel
    height, width = cfg.train.crop or (data.height, data.width)
    params = parameter_count(cfg.model)
    grid = token_grid(cfg.model, data.frames, height, width)
    global_batch = data.batch_size * parallel.grad_accum * world_size
    fwd = forward_flops(cfg.model, data.frames, height, width, cfg.text.max_length).total
    # model states per device (DeepSpeed ZeRO accounting): weights, gradients, fp32 master + Adam m, v
    w_bytes = 2 if parallel.precision in ("bf16", "fp16") else 4
    master = 4 if parallel.precision in ("bf16", "fp16") else 0
    weights, grads, optim = w_bytes, w_bytes, master + 8
    n = world_size
    if parallel.zero_stage >= 1:
        optim /= n
    if parallel.zero_stage >= 2:
        grads /= n
    if parallel.zero_stage >= 3:
        weights /= n
    if parallel.offload_optimizer:
        optim = 0
    ema = 4 / (n if parallel.zero_stage >= 3 else 1)
    return {
        "world_size": world_size,
        "zero_stage": parallel.zero_stage,
        "precision": parallel.precision,
        "micro_batch": data.batch_size,
        "grad_accum": parallel.grad_accum,
        "global_batch": global_batch,
        "parameters": params,
        "tokens_per_sample": math.prod(grid),
        "flops_per_step": 3 * fwd * global_batch,
        "model_state_gib_per_device": params * (weights + grads + optim + ema) / 2**30,
    }


def format_training_plan(info: dict[str, Any]) -> str:
    rows = [
        ("world size", info["world_size"]),
        ("ZeRO stage", info["zero_stage"]),
        ("precision", info["precision"]),
        (
            "global batch",
            f"{info['global_batch']} = {info['micro_batch']} × {info['grad_accum']} accum × "
            f"{info['world_size']} ranks",
        ),
        ("parameters", f"{info['parameters'] / 1e6:.2f} M"),
        ("tokens per sample", info["tokens_per_sample"]),
        ("FLOPs per step", f"{info['flops_per_step']:.3e} (forward + backward, 3 × forward)"),
        (
            "memory per device",
            f"{info['model_state_gib_per_device']:.3f} GiB of model states "
            "(weights, grads, optimizer, EMA; activations not included)",
        ),
    ]
    return key_value_table(rows)
