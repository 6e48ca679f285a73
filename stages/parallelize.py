"""Changes applied to a model from outside it (DESIGN.md rule 4, torchtitan's `parallelize_*`):
activation checkpointing now; the DeepSpeed config builder joins it with the training stage."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from configs.schema import ParallelConfig


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every transformer block of `model.blocks` so its activations are recomputed in backward.

    State-dict keys are unchanged (the wrapper strips its own prefix), so checkpoints stay compatible.
    Returns the number of wrapped blocks.
    """
    blocks = model.blocks
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return len(blocks)


def parallelize_model(model: nn.Module, cfg: ParallelConfig) -> nn.Module:
    """Apply what `parallel` asks for to a freshly built model, in place; returns it."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model
