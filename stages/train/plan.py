"""What a run will do per step, computed from the config alone: the plan printed before training."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from configs import ConfigError, RunConfig, load_config
from models.flops import forward_flops, parameter_count, token_grid
from stages.artifacts import resolve_committed
from stages.tables import key_value_table

ACTIVATION_BYTES = {"fp32": 172, "bf16": 126, "fp16": 126}
"""Bytes a transformer block keeps for backward per token and per unit of model width, by precision:
measured with autograd's saved-tensor hooks on the CPU (tests/unit/train/test_sequence_plan.py checks the
estimate against the model), SDPA attention without a mask, no activation checkpointing."""


def saved_tensor_bytes(module: torch.nn.Module, run: Callable[[], object]) -> int:
    """Bytes autograd keeps for backward while `run()` runs a forward of `module` (each storage once, the
    module's parameters left out): the measured activation memory `ACTIVATION_BYTES` comes from."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(seen.values())


def activation_gib(cfg: RunConfig, tokens: int) -> float:
    """Expected activation memory (GiB) of one micro-batch of `tokens` tokens on one rank: every block's
    saved tensors, or with activation checkpointing each block's input plus one block recomputed."""
    per_block = ACTIVATION_BYTES[cfg.parallel.precision] * cfg.model.width * tokens
    if cfg.parallel.activation_checkpointing:
        inputs = cfg.model.depth * tokens * cfg.model.width * (4 if cfg.parallel.precision == "fp32" else 2)
        return (inputs + per_block) / 2**30
    return cfg.model.depth * per_block / 2**30


def teacher_forwards(cfg: RunConfig) -> int:
    """Teacher forward passes per sample of a distillation step: two DDIM evaluations in a progressive
    round, one in a guidance round, each two passes (conditional and unconditional) where a guidance-
    input student learns from a teacher without that input, else one. Whether the teacher takes the
    weight is read from its checkpoint; before it exists, a progressive round's teacher is assumed to
    take it when the student does (a pipeline's guided chain)."""
    d = cfg.distill
    if not d.teacher:
        return 0
    evaluations = 2 if d.steps else 1
    if not cfg.model.guidance_range:
        return evaluations
    teacher_guided = bool(d.steps)
    try:
        step = resolve_committed(d.teacher, "distill.teacher")
        teacher_guided = bool(load_config([step / "config.yaml"]).model.guidance_range)
    except (FileNotFoundError, ConfigError):
        pass
    return evaluations * (1 if teacher_guided else 2)


def training_plan(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """What a run will do per step, computed from the config alone (the plan printed before training)."""
    data, parallel = cfg.data, cfg.parallel
    height, width = cfg.train.crop or (data.height, data.width)
    params = parameter_count(cfg.model)
    grid = token_grid(cfg.model, data.frames, height, width)
    sp = parallel.sequence_parallel
    dp = world_size // sp
    global_batch = data.batch_size * parallel.grad_accum * dp
    tokens_per_rank = math.prod(grid) // sp
    fwd = forward_flops(cfg.model, data.frames, height, width, cfg.text.max_length).total
    teacher = teacher_forwards(cfg)  # reads the teacher's config once
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
        "data_parallel": dp,
        "sequence_parallel": sp,
        "zero_stage": parallel.zero_stage,
        "precision": parallel.precision,
        "micro_batch": data.batch_size,
        "grad_accum": parallel.grad_accum,
        "global_batch": global_batch,
        "parameters": params,
        "tokens_per_sample": math.prod(grid),
        "tokens_per_rank": tokens_per_rank,
        "teacher_forwards": teacher,
        "flops_per_step": (3 + teacher) * fwd * global_batch,
        "model_state_gib_per_device": params * (weights + grads + optim + ema) / 2**30,
        "activation_gib_per_device": activation_gib(cfg, tokens_per_rank * data.batch_size),
    }


def format_training_plan(info: dict[str, Any]) -> str:
    rows = [
        (
            "world size",
            f"{info['world_size']} = {info['data_parallel']} data-parallel × {info['sequence_parallel']} "
            "sequence-parallel",
        ),
        ("ZeRO stage", info["zero_stage"]),
        ("precision", info["precision"]),
        (
            "global batch",
            f"{info['global_batch']} = {info['micro_batch']} × {info['grad_accum']} accum × "
            f"{info['data_parallel']} data-parallel ranks",
        ),
        ("parameters", f"{info['parameters'] / 1e6:.2f} M"),
        ("tokens per sample", info["tokens_per_sample"]),
        (
            "tokens per rank",
            f"{info['tokens_per_rank']} per sample (1/{info['sequence_parallel']} of its frames)",
        ),
        ("FLOPs per step", f"{info['flops_per_step']:.3e} ({_flops_terms(info['teacher_forwards'])})"),
        (
            "memory per device",
            f"{_size(info['model_state_gib_per_device'])} of model states (weights, grads, optimizer, "
            f"EMA) + {_size(info['activation_gib_per_device'])} of activations per micro-batch (estimate)",
        ),
    ]
    return key_value_table(rows)


def _flops_terms(teacher: int) -> str:
    own = "forward + backward, 3 × forward"
    return f"{own}, + {teacher} teacher forward(s)" if teacher else own


def _size(gib: float) -> str:
    return f"{gib:.3f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"
