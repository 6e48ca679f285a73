"""Sequence parallelism for factorized attention: one clip's tokens over `parallel.sequence_parallel` ranks.

The world is data-parallel × sequence-parallel, rank = dp_rank · N + sp_rank (`Layout`): the N ranks of a
sequence group are neighbours (one node), see the same samples (the loader and the training generator key
on the data-parallel rank) and each holds T'/N whole frames of every clip. What runs per token or per
frame (patch embedding, modulation, spatial attention, cross-attention, the MLP, the loss) runs on those
frames; temporal attention needs every frame of a spatial position, so the block switches to S/N
positions of all T' frames and back, one all-to-all each way (`SequenceGroup`, the model's
`SequenceSplit`; Zhao et al. 2024's dynamic sequence parallelism). Nothing here is in `models/`: the
model only calls the object it is handed (DESIGN.md rule 4).

The loss and its gradient: each rank's per-sample loss is the mean over its frames; the sample's loss is
the mean over the group (`SequenceGroup.mean`, whose backward is the identity: every rank backpropagates
its own frames' share with the upstream gradient unchanged, which is what the all-reduce's exact adjoint
gives when every rank holds the same upstream gradient). The rank's gradient of its copy of the weights
then holds its frames' share (and, through the all-to-all's adjoint, its share of the other ranks'
frames), so the sum over the group is the sample's gradient ×N, and DeepSpeed's average over all
dp × N ranks is the data-parallel average of the samples' gradients. That is why DeepSpeed is given the
whole world as its data-parallel group: ZeRO 1–3 partition over all dp × N ranks (as DeepSpeed's own
sequence parallelism does), which also divides the optimizer state by N more than a data-parallel-only
partition would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """Where a rank sits in the data-parallel × sequence-parallel world."""

    rank: int
    world: int
    sp: int
    """Ranks per sequence group (parallel.sequence_parallel)."""

    @property
    def dp(self) -> int:
        """Data-parallel ranks: sequence groups."""
        return self.world // self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp


class SequenceGroup:
    """The `models.dit.SequenceSplit` of one sequence group: this rank's slice of frames, the
    frames ↔ positions all-to-all, and the group mean of the loss."""

    def __init__(self, group: dist.ProcessGroup | None, size: int, rank: int) -> None:
        self.group, self.size, self.rank = group, size, rank

    @classmethod
    def create(cls, layout: Layout) -> SequenceGroup | None:
        """Collective over the world (every rank makes every group, in the same order): this rank's
        sequence group, or None without sequence parallelism."""
        if layout.sp == 1:
            return None
        mine = None
        for first in range(0, layout.world, layout.sp):
            group = dist.new_group(list(range(first, first + layout.sp)))
            if first == layout.dp_rank * layout.sp:
                mine = group
        return cls(mine, layout.sp, layout.sp_rank)

    # ---- the split -----------------------------------------------------------------------------------

    def shard(self, x: Tensor, dim: int) -> Tensor:
        """This rank's contiguous 1/N of `x` along `dim` (frames)."""
        if x.shape[dim] % self.size:
            raise ValueError(
                f"sequence parallelism over {self.size} ranks: {x.shape[dim]} frames do not split evenly"
            )
        return x.chunk(self.size, dim=dim)[self.rank]

    def frames_to_positions(self, x: Tensor) -> Tensor:
        return _Exchange.apply(x, self, True)

    def positions_to_frames(self, x: Tensor) -> Tensor:
        return _Exchange.apply(x, self, False)

    @torch.no_grad()
    def gather_frames(self, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def mean(self, x: Tensor) -> Tensor:
        """The group mean of `x` (every rank's share of the same samples); backward: identity."""
        return _GroupMean.apply(x, self)

    # ---- the all-to-all ------------------------------------------------------------------------------

    def exchange(self, x: Tensor, to_positions: bool) -> Tensor:
        """(B, T'/N, S, D) → (B, T', S/N, D) when `to_positions`, else the inverse."""
        n = self.size
        if to_positions:
            send = rearrange(x, "B T (N S) D -> N B T S D", N=n).contiguous()
        else:
            send = rearrange(x, "B (N T) S D -> N B T S D", N=n).contiguous()
        received = torch.empty_like(send)  # received[i]: rank i's part
        dist.all_to_all_single(received, send, group=self.group)
        if to_positions:
            return rearrange(received, "N B T S D -> B (N T) S D")  # rank i held frames i·T'/N onwards
        return rearrange(received, "N B T S D -> B T (N S) D")


class _Exchange(torch.autograd.Function):
    """The all-to-all between frames and positions; a permutation, so its adjoint is its inverse."""

    @staticmethod
    def forward(ctx, x: Tensor, group: SequenceGroup, to_positions: bool) -> Tensor:  # type: ignore[override]
        ctx.group, ctx.to_positions = group, to_positions
        return group.exchange(x, to_positions)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return ctx.group.exchange(grad, not ctx.to_positions), None, None


class _GroupMean(torch.autograd.Function):
    """All-reduce mean over the sequence group with an identity backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: SequenceGroup) -> Tensor:  # type: ignore[override]
        total = x.detach().clone()
        dist.all_reduce(total, group=group.group)
        return total / group.size

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None
