"""Changes applied to a model from outside it (DESIGN.md rule 4, torchtitan's `parallelize_*`):
activation checkpointing, regional torch.compile, and the DeepSpeed config the training stage wraps the
model with."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from configs import ParallelConfig, RunConfig
from stages.train.ops import adam_params


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every transformer block of `model.blocks` so its activations are recomputed in backward.

    State-dict keys are unchanged (the wrapper strips its own prefix), so checkpoints stay compatible.
    Returns the number of wrapped blocks.
    """
    blocks = model.blocks
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return len(blocks)


def apply_compile(model: nn.Module) -> int:
    """Compile every transformer block of `model.blocks` with `torch.compile` (regional compilation, as
    torchtitan does), not the whole model: the blocks are where the time goes, identical blocks share
    their compiled code, so compile time does not grow with depth, and the input checks, embeddings and
    per-forward context around them stay eager.

    `Module.compile` compiles in place: the blocks keep their type and state-dict keys, so checkpoints
    and exported weights are unchanged. Compilation happens on a block's first call. Apply it after
    `apply_activation_checkpointing`, so the recomputation wrapper is inside the compiled region.
    Returns the number of compiled blocks.
    """
    for block in model.blocks:
        block.compile()
    return len(model.blocks)


def parallelize_model(model: nn.Module, cfg: ParallelConfig, compile_blocks: bool = False) -> nn.Module:
    """Apply what `parallel` asks for to a freshly built model, in place, then compile its blocks when
    `compile_blocks` (train.compile) is set; returns it. Call before `deepspeed.initialize`."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile_blocks:
        apply_compile(model)
    return model


def restore_torch_linear() -> None:
    """Put back torch's own `torch.nn.functional.linear` if a ZeRO-3 engine built earlier in this process
    replaced it: DeepSpeed's ZeRO-3 swaps in its memory-efficient linear process-wide and leaves it there
    ("This will persist unless manually reset"), so a later non-ZeRO-3 training in the same process (a
    test, a notebook) would compute its gradients another way than a fresh process, and a run resumed
    in a fresh process would not reproduce it."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear warm-up over
    `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))


def deepspeed_config(cfg: RunConfig, world_size: int, cuda: bool | None = None) -> dict[str, Any]:
    """The DeepSpeed config for a run: ours, or the user's JSON (`parallel.deepspeed_config`) after
    checking that its batch sizes, ZeRO stage and precision agree with the run config.

    Without CUDA (`cuda`: default torch.cuda.is_available()) an Adam or AdamW optimizer is torch's own
    (`"torch_adam": true`, unless the user's JSON sets it): DeepSpeed's fused Adam would be compiled at
    run time (`stages/train/ops.py`)."""
    merged = _merged_config(cfg, world_size)
    on_cuda = torch.cuda.is_available() if cuda is None else cuda
    return merged if on_cuda else _with_torch_adam(merged)


def _with_torch_adam(ds: dict[str, Any]) -> dict[str, Any]:
    params = adam_params(ds)
    if params is None or "torch_adam" in params:
        return ds
    return {**ds, "optimizer": {**ds["optimizer"], "params": {**params, "torch_adam": True}}}


def _merged_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    p, t = cfg.parallel, cfg.train
    micro, accum = cfg.data.batch_size, p.grad_accum
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": t.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "weight_decay": t.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8},
        },
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": p.precision == "bf16"},
        "fp16": {"enabled": p.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,  # progress is ours (stages/metrics.py)
        "wall_clock_breakdown": False,
    }
    if p.offload_optimizer:
        ours["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if not p.deepspeed_config:
        return ours
    path = Path(p.deepspeed_config)
    try:
        user = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"parallel.deepspeed_config: cannot read {path}: {exc}") from exc
    checks = {
        "train_micro_batch_size_per_gpu": ("data.batch_size", micro),
        "gradient_accumulation_steps": ("parallel.grad_accum", accum),
        "train_batch_size": (
            f"data.batch_size × parallel.grad_accum × world size {world_size}",
            micro * accum * world_size,
        ),
    }
    for key, (source, expected) in checks.items():
        if key in user and user[key] != expected:
            raise ValueError(
                f"{path}: {key} = {user[key]} disagrees with the run config ({source} = {expected})"
            )
    stage = user.get("zero_optimization", {}).get("stage", p.zero_stage)
    if stage != p.zero_stage:
        raise ValueError(
            f"{path}: zero_optimization.stage = {stage} disagrees with parallel.zero_stage = {p.zero_stage}"
        )
    for precision in ("bf16", "fp16"):
        enabled = bool(user.get(precision, {}).get("enabled", False))
        if enabled != (p.precision == precision):
            raise ValueError(
                f"{path}: {precision}.enabled = {enabled} disagrees with parallel.precision = {p.precision}"
            )
    return {
        **ours,
        **user,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
    }
