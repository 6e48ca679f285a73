"""Sequence parallelism of the video DiT: per-rank activation memory, step time and all-to-all traffic at
sp = 1, 2, 4 for one long clip; prints a table and writes JSON.

    python bench/sequence_parallel.py                                   # CPU: gloo, 32×64×64 px, patch 1×4×4
    python bench/sequence_parallel.py --device cuda --sp 1 2 4 8 --width 384 --depth 12 --heads 6 \\
        --frames 64 --size 256 --patch 1 8 8 --dtype bf16               # one GPU per rank, NCCL

Every rank of a group of `sp` processes holds T'/sp frames of the same clip (`stages/train/
sequence_parallel.py`). Per rank and step (forward + backward of the model, loss = mean square output):

- activation memory: the bytes autograd keeps for backward in one forward (saved-tensor hooks, storages
  counted once, parameters left out), and on CUDA the peak allocated memory of the step;
- step time (median); the time inside the frames ↔ positions all-to-alls, as a share of the step; and
  apart from it the time spent waiting for the slower peer before each (a barrier the benchmark adds,
  so that imbalance between ranks is not counted as communication);
- all-to-all bytes each rank sends per temporal layer and step (4 exchanges: 2 forward, 2 backward, each
  sending (sp-1)/sp of the rank's tokens) beside the layer's FLOPs per rank (`models.flops`, 3× forward).

On the CPU the processes share the machine's cores (threads per rank = cores / sp), so step times compare
the same total compute split differently; rows with more ranks than cores are marked oversubscribed.
This is a benchmark, never a test: numbers go to docs/PERFORMANCE.md with the machine and the command.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from report import print_table, record_header, sig, sync, write_record

from configs import model_config
from models.dit import VideoDiT
from models.flops import forward_flops
from stages.precision import torch_dtype
from stages.train.plan import saved_tensor_bytes
from stages.train.sequence_parallel import Layout, SequenceGroup


def worker(rank: int, sp: int, store: str, args: argparse.Namespace, results: dict) -> None:
    cuda = args.device == "cuda"
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // sp))
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=sp)
    group = SequenceGroup.create(Layout(rank, sp, sp))
    comm = [0.0, 0.0]  # seconds waiting for the peers, seconds exchanging
    if group is not None:  # time every all-to-all: a barrier first, so that waits and transfers part
        exchange = group.exchange

        def timed(x: torch.Tensor, to_positions: bool) -> torch.Tensor:
            sync(device)
            start = time.perf_counter()
            dist.barrier(group=group.group)
            ready = time.perf_counter()
            out = exchange(x, to_positions)
            sync(device)
            comm[0] += ready - start
            comm[1] += time.perf_counter() - ready
            return out

        group.exchange = timed  # type: ignore[method-assign]

    dtype = torch_dtype(args.dtype)
    cfg = model_of(args)
    torch.manual_seed(0)
    model = VideoDiT(cfg).to(device, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.frames, args.size, args.size, generator=g)
    x = (x if group is None else group.shard(x, 2)).to(device, dtype)
    t = torch.rand(args.batch, generator=g).to(device)
    text = torch.randn(args.batch, args.text_tokens, cfg.text_dim, generator=g).to(device, dtype)

    def forward() -> torch.Tensor:
        return model(x, t, text=text, sequence=group)

    def step() -> None:
        forward().float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    kept = saved_tensor_bytes(model, forward)
    times, comms = [], []
    for i in range(args.warmup + args.iters):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        dist.barrier()
        comm[:] = [0.0, 0.0]
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            comms.append(list(comm))
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    mine = {
        "step_s": statistics.median(times),
        "wait_s": statistics.median(c[0] for c in comms),
        "comm_s": statistics.median(c[1] for c in comms),
        "kept": kept,
        "peak": peak,
    }
    gathered = [None] * sp
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        results[sp] = gathered
    dist.destroy_process_group()


def model_of(args: argparse.Namespace):
    return model_config(width=args.width, depth=args.depth, heads=args.heads, patch_size=list(args.patch))


def row(sp: int, ranks: list[dict], args: argparse.Namespace) -> dict:
    cfg = model_of(args)
    pt, ph, pw = args.patch
    tp, s = args.frames // pt, (args.size // ph) * (args.size // pw)
    tokens = args.batch * tp * s // sp  # per rank
    width_bytes = cfg.width * torch_dtype(args.dtype).itemsize
    sent = 4 * (sp - 1) / sp * tokens * width_bytes  # per temporal layer and step
    flops = 3 * forward_flops(cfg, args.frames, args.size, args.size, args.text_tokens).total * args.batch
    layer_flops = flops / cfg.depth / sp
    step = max(r["step_s"] for r in ranks)
    comm = max(r["comm_s"] for r in ranks)
    wait = max(r["wait_s"] for r in ranks)
    cores = os.cpu_count() or 1
    return {
        "sp": sp,
        "tokens_per_rank": tokens,
        "activation_MiB_per_rank": sig(max(r["kept"] for r in ranks) / 2**20),
        "peak_MiB_per_rank": sig(max(r["peak"] for r in ranks) / 2**20) if args.device == "cuda" else "-",
        "step_s": sig(step),
        "all_to_all_s": sig(comm),
        "all_to_all_%": sig(100 * comm / step, 2),
        "peer_wait_%": sig(100 * wait / step, 2),
        "a2a_MiB_per_layer": sig(sent / 2**20),
        "GFLOP_per_layer": sig(layer_flops / 1e9),
        "FLOP_per_a2a_byte": sig(layer_flops / sent) if sent else "-",
        "note": "oversubscribed" if args.device == "cpu" and sp > cores else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--patch", type=int, nargs=3, default=[1, 4, 4])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=16)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/sequence_parallel.json"))
    args = parser.parse_args()
    results = mp.Manager().dict()
    for sp in args.sp:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(worker, args=(sp, f"{tmp}/store", args, results), nprocs=sp, join=True)
    rows = [row(sp, results[sp], args) for sp in args.sp]
    base = rows[0]["activation_MiB_per_rank"]
    for r in rows:
        r["activation_vs_sp1"] = sig(r["activation_MiB_per_rank"] / base, 2)
    print_table(rows)
    record = record_header("sequence_parallel", torch.device(args.device), args)
    write_record(args.out, {**record, "rows": rows})


if __name__ == "__main__":
    sys.exit(main())
