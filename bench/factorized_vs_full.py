"""Forward+backward time of one DiT block with factorized attention against the same block with full
3-D attention over all T'·S tokens, beside their FLOP ratio; prints a table and writes JSON.

    python bench/factorized_vs_full.py                # CPU default: width 128, 4 heads, S = 8×8, T' = 4 8 16
    python bench/factorized_vs_full.py --preset h200  # width 1152, 16 heads, S = 32×32, T' = 16 32 64, bf16

Factorized: the real `models.dit.DiTBlock` of a depth-1 `VideoDiT`, run with the `BlockContext` that
`VideoDiT.forward` builds (`VideoDiT.block_context`): spatial attention over each frame's S tokens, temporal
attention over each position's T' tokens, cross-attention to text, MLP. Full: the same block, weights
and inputs; only the context changes: grid (1, T'·H', W'), so spatial attention sees all T'·S tokens of
a clip as one sequence (the spatial RoPE table repeated per frame; a 3-D RoPE costs the same), and
`run_temporal=False`. Skipping temporal attention is what a full-attention DiT does: every token already
attends to every token of every frame, so it has no temporal sub-layer (and no temporal projections).
Everything else (norms, modulation, cross-attention, MLP) is identical, so the ratio isolates the
attention pattern.

Timed: forward + backward of the block (gradients of its input and of every weight), median of rounds of
back-to-back steps, synchronized at round ends on CUDA. Not timed: building the block and its context
(RoPE tables, text projection). The attention backend is the model's (`--backend`, default auto).

FLOPs: torch.utils.flop_counter.FlopCounterMode over one forward + backward of each variant on the meta
device (no memory, no compute) with the naive attention backend, whose einsums the counter sees (it
counts neither CPU SDPA kernels nor xformers), so both variants follow one rule: every matmul 2·m·k·n,
forward and backward, no recomputation; element-wise work not counted. `models/flops.py` only counts
forwards of whole factorized models; its per-block forward (depth 2 minus depth 1) is checked against the
counter's forward of the factorized block (`flops_check`). The issue's targets (≥ 1.7×, 3×, 5× at
T' = 16, 32, 64) apply to S = 1024 only.
This is a benchmark, never a test: numbers go to docs/PERFORMANCE.md with the machine and the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from report import fill_preset, print_table, record_header, sig, time_call, write_record
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from configs import ModelConfig, model_config
from models.dit import BlockContext, DiTBlock, VideoDiT
from models.flops import forward_flops
from stages.precision import torch_dtype

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"batch": 1, "grid": [8, 8], "frames": [4, 8, 16], "width": 128, "heads": 4, "dtype": "fp32"},
    "h200": {
        "batch": 2,
        "grid": [32, 32],
        "frames": [16, 32, 64],
        "width": 1152,
        "heads": 16,
        "dtype": "bf16",
    },
}
TARGETS = {16: 1.7, 32: 3.0, 64: 5.0}  # full ÷ factorized wall clock at S = 1024 (docs/PERFORMANCE.md)


def dit_block(
    cfg: ModelConfig,
    batch: int,
    grid: tuple[int, int, int],
    text_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[DiTBlock, Tensor, Tensor, BlockContext]:
    """The block of a depth-1 VideoDiT in `dtype` on `device`, its inputs x (B, T'·S, D) and c (B, 1, D),
    and the BlockContext `VideoDiT.forward` builds for a (B, C, T, H, W) clip of patch grid `grid`."""
    torch.manual_seed(0)
    with torch.device(device):
        model = VideoDiT(dataclasses.replace(cfg, depth=1))
        pixels = torch.empty(batch, cfg.in_channels, *(g * p for g, p in zip(grid, cfg.patch_size)))
        text = torch.randn(batch, text_tokens, cfg.text_dim)
        mask = torch.ones(batch, text_tokens, dtype=torch.bool)
        with torch.no_grad():
            ctx = model.block_context(pixels, grid, None, text, mask)
        x = torch.randn(batch, math.prod(grid), cfg.width, dtype=dtype)  # (B, T'·S, D)
        c = torch.randn(batch, 1, cfg.width, dtype=dtype)  # (B, 1, D)
    return model.blocks[0].to(dtype), x, c, dataclasses.replace(ctx, text=ctx.text.to(dtype))


def full_context(ctx: BlockContext) -> BlockContext:
    """The factorized context turned into full 3-D attention: one 'frame' of all T'·S tokens (spatial
    RoPE table repeated per frame), temporal attention off."""
    tp, hp, wp = ctx.grid
    rope = ctx.spatial_rope
    return dataclasses.replace(
        ctx,
        grid=(1, tp * hp, wp),
        spatial_rope=None if rope is None else (rope[0].repeat(tp, 1), rope[1].repeat(tp, 1)),
        temporal_rope=None,
        run_temporal=False,
        temporal_segments=None,
        temporal_keep=None,
    )


def step_fn(block: DiTBlock, x: Tensor, c: Tensor, ctx: BlockContext) -> Callable[[], Any]:
    """One forward + backward of the block: gradients of x and of every weight (reset, not accumulated)."""
    x = x.detach().requires_grad_()
    grad = torch.randn_like(x)

    def step() -> None:
        x.grad = None
        block.zero_grad(set_to_none=True)
        block(x, c, ctx).backward(grad)

    return step


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure(tp: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One table row: both variants at T' = tp, wall clock and counted FLOPs."""
    dtype, (hp, wp) = torch_dtype(args.dtype), args.grid
    grid, s = (tp, hp, wp), hp * wp
    cfg = model_config(
        "tiny", width=args.width, heads=args.heads, patch_size=[1, 1, 1], attention_backend=args.backend
    )
    block, x, c, ctx = dit_block(cfg, args.batch, grid, args.text_tokens, device, dtype)
    times = {}
    for name, context in (("factorized", ctx), ("full", full_context(ctx))):
        try:
            times[name] = time_call(step_fn(block, x, c, context), device, args.warmup, args.rounds)
        except torch.OutOfMemoryError:
            times[name] = None
    del block, x, c, ctx
    if device.type == "cuda":
        torch.cuda.empty_cache()

    meta = torch.device("meta")
    block, x, c, ctx = dit_block(cfg, args.batch, grid, args.text_tokens, meta, dtype)
    ctx = dataclasses.replace(ctx, backend="naive")
    flops = {
        name: count_flops(step_fn(block, x, c, k))
        for name, k in (("factorized", ctx), ("full", full_context(ctx)))
    }
    forward = count_flops(lambda: block(x, c, ctx))
    per_block = [
        forward_flops(dataclasses.replace(cfg, depth=d), *grid, args.text_tokens).total for d in (1, 2)
    ]
    check = forward / ((per_block[1] - per_block[0]) * args.batch)

    fact, full = times["factorized"], times["full"]
    ms = {k: "OOM" if v is None else round(v * 1e3, 2) for k, v in times.items()}
    target = TARGETS.get(tp) if s == 1024 else None
    return {
        "T'": tp,
        "S": s,
        "tokens": tp * s,
        "batch": args.batch,
        "factorized_ms": ms["factorized"],
        "full_ms": ms["full"],
        "time_ratio": "-" if fact is None or full is None else round(full / fact, 2),
        "flop_ratio": round(flops["full"] / flops["factorized"], 2),
        "target": target or "-",
        "factorized_TFLOPs": "-" if fact is None else sig(flops["factorized"] / fact / 1e12),
        "full_TFLOPs": "-" if full is None else sig(flops["full"] / full / 1e12),
        "factorized_GFLOP": sig(flops["factorized"] / 1e9, 4),
        "full_GFLOP": sig(flops["full"] / 1e9, 4),
        "flops_check": round(check, 4),  # counter forward ÷ models.flops per-block forward: 1.0
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu", help="defaults of the size args")
    parser.add_argument("--frames", type=int, nargs="+", help="T' values (patch-grid frames)")
    parser.add_argument("--grid", type=int, nargs=2, help="H' W' (S = H'·W' spatial tokens)")
    parser.add_argument("--width", type=int, help="model width D")
    parser.add_argument("--heads", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--dtype", choices=["fp32", "bf16"])
    parser.add_argument("--text-tokens", type=int, default=64, help="cross-attention keys (text.max_length)")
    parser.add_argument("--backend", choices=["auto", "xformers", "sdpa", "naive"], default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/factorized_vs_full.json"))
    args = parser.parse_args()
    fill_preset(args, PRESETS[args.preset])
    device = torch.device(args.device)

    rows = [measure(tp, args, device) for tp in args.frames]
    print_table(rows)
    record = {
        **record_header("factorized_vs_full", device, args),
        "flops": "FlopCounterMode, forward + backward, naive attention on the meta device",
        "rows": rows,
    }
    write_record(args.out, record)


if __name__ == "__main__":
    main()
