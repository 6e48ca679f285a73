"""Forward+backward time of the video DiT per preset and input size; prints a table and writes JSON.

    python bench/model_step.py --presets tiny S --frames 8 --size 32 --batch 2 --backend sdpa
    python bench/model_step.py --presets XL --frames 16 --size 64 --patch 1 4 4 --dtype bf16 --device cuda

Achieved FLOP/s counts 3× the forward FLOPs of `models.flops` (forward + backward), the usual MFU basis.
This is a benchmark, never a test: numbers go to docs/PERFORMANCE.md with the machine and the command.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from report import machine, print_table, sync, write_record

from configs import model_config
from models.dit import VideoDiT
from models.flops import forward_flops, parameter_count
from stages.precision import torch_dtype


def measure(preset: str, args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), torch_dtype(args.dtype)
    cfg = model_config(preset, patch_size=list(args.patch), attention_backend=args.backend)
    model = VideoDiT(cfg).to(device)
    x = torch.randn(args.batch, 3, args.frames, args.size, args.size, device=device)
    t = torch.rand(args.batch, device=device)
    text = torch.randn(args.batch, args.text_tokens, cfg.text_dim, device=device)
    times = []
    for i in range(args.warmup + args.iters):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(x, t, text=text)
        out.float().square().mean().backward()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    step = statistics.median(times)
    flops = 3 * forward_flops(cfg, args.frames, args.size, args.size, args.text_tokens).total * args.batch
    tp, hp, wp = (s // p for s, p in zip((args.frames, args.size, args.size), cfg.patch_size))
    return {
        "preset": preset,
        "params_M": round(parameter_count(cfg) / 1e6, 3),
        "input": f"{args.batch}x3x{args.frames}x{args.size}x{args.size}",
        "tokens_per_sample": tp * hp * wp,
        "step_ms": round(step * 1e3, 2),
        "samples_per_s": round(args.batch / step, 2),
        "achieved_TFLOPs": round(flops / step / 1e12, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "S"])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--patch", type=int, nargs=3, default=[1, 2, 2])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=16)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/model_step.json"))
    args = parser.parse_args()
    torch.manual_seed(0)

    rows = [measure(preset, args) for preset in args.presets]
    print_table(rows)

    record = {
        "benchmark": "model_step",
        "date": date.today().isoformat(),
        "machine": machine(torch.device(args.device)),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
    }
    write_record(args.out, record)


if __name__ == "__main__":
    main()
