"""Changes applied to a model from outside it (DESIGN.md rule 4): activation checkpointing now; DeepSpeed
config building joins it with the training stage."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every transformer block of `model.blocks` so its activations are recomputed in backward.

    State-dict keys are unchanged (the wrapper strips its own prefix), so checkpoints stay compatible.
    Returns the number of wrapped blocks.
    """
    blocks = model.blocks
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return len(blocks)
