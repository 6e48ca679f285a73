"""What the training loop (`stages/train/loop.py`) reads from the device, and when.

On a GPU every read of a device value (`.item()`, `.tolist()`, `float(tensor)`, a Python `if` on a
tensor) makes the host wait until the device has caught up, so the host can no longer queue work ahead.
The loop keeps one such wait per micro-batch: whether the micro-batch loss is finite, which must be
known before backward (a non-finite loss skips backward and the optimizer). `nonfinite` answers it for
several values at once.

Settling one step late. A step is settled when its verdict is known and acted on: skipped (a non-finite
loss, or a non-finite global gradient norm: DeepSpeed skipped an fp16 overflow or the gradient blew up)
or kept (the EMA update), then its metrics. When DeepSpeed returns the gradient norm as a device tensor,
reading it at once would be a second wait per step. The step is then held as the pending `StepRecord`,
and its gradient norm joins the next step's first loss check, in the same `nonfinite` call: that wait
settles the pending step after the next step's forward and before its backward, while the weights are
still the pending step's own. Steps that write a log line, a preview or a checkpoint (`settled_at_once`)
are settled right away (`grad_norm_bad`, one more read), so what they write is settled; so is a step
still pending when a SIGTERM stops the loop, before the preemption checkpoint. Either way a step gets
the same verdict.

Everything else a step produces (its losses, per-sample losses and gradient norm) stays on the device in
a `StepRecord` until a log line (`train.log_every`), a preview, a checkpoint or the end of training reads
it, in one transfer (`read_means`, `stages.train.metrics.read_values`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from configs.schema import TrainConfig
from stages.train.metrics import read_values


def nonfinite(values: list[Tensor]) -> list[bool]:
    """Per value: whether it holds a non-finite number on any rank. One wait for the device (and one
    all_reduce when distributed) for the whole list."""
    device = values[0].device
    flags = torch.stack([(~torch.isfinite(v.detach())).any().to(device) for v in values]).float()
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [flag > 0 for flag in flags.tolist()]


def grad_norm_bad(grad_norm: Tensor | float | None) -> bool:
    """Whether DeepSpeed's global gradient norm is non-finite (None: the engine reports none). Reads a
    device tensor: the loop calls it only on steps that are settled at once."""
    return grad_norm is not None and not math.isfinite(float(grad_norm))


def settled_at_once(step: int, train_cfg: TrainConfig) -> bool:
    """Whether step `step` (1-based) writes a log line, a preview or a checkpoint: its outcome is then
    settled right away rather than on the next step's wait."""
    return (
        step % train_cfg.log_every == 0
        or step >= train_cfg.steps
        or step % train_cfg.checkpoint_every == 0
        or bool(train_cfg.preview_every and step % train_cfg.preview_every == 0)
    )


@dataclass
class StepRecord:
    """One optimizer step as the loop made it; tensors may still be on the device."""

    bad: bool = False
    """A micro-batch loss was non-finite on some rank (backward and the optimizer were skipped)."""
    losses: list[Tensor] = field(default_factory=list)
    """Each micro-batch's mean loss."""
    times: list[Tensor] = field(default_factory=list)
    """Each micro-batch's per-sample diffusion times (mean over frames for packed images), on the CPU."""
    sample_losses: list[Tensor] = field(default_factory=list)
    """Each micro-batch's per-sample losses."""
    samples: int = 0
    """Samples of the step over all ranks."""
    tokens: int = 0
    """Patch tokens of the step over all ranks."""
    wait: float = 0.0
    """Seconds this rank waited for data."""
    step: int = 0
    """Optimizer steps done once this one is (1-based)."""
    lr: float = 0.0
    """Learning rate after the step."""
    grad_norm: Tensor | float | None = None
    """DeepSpeed's global gradient norm (None when the engine reports none)."""

    def timestep_losses(self) -> tuple[Tensor, Tensor] | None:
        """(times, per-sample losses) over the micro-batches, for `TrainMetrics.step`."""
        return (torch.cat(self.times), torch.cat(self.sample_losses)) if self.times else None


def read_means(losses: list[float | Tensor]) -> None:
    """Replace the trailing tensors of micro-batch losses in `losses` by their means, in place: np.mean of
    their floats, as the loop has always computed a step's loss; one transfer for all of them."""
    start = len(losses)
    while start > 0 and isinstance(losses[start - 1], Tensor):
        start -= 1
    if start < len(losses):
        losses[start:] = [float(np.mean(values)) for values in read_values(losses[start:])]
