"""Time of the real training step (DeepSpeed engine of `stages/train/loop.py`) per preset, clip size, ZeRO
stage and precision, on synthetic in-memory batches; prints a table and writes JSON.

    python bench/train_step.py                    # CPU default: tiny, 8×16×16 px, patch (1, 4, 4)
    python bench/train_step.py --zero 0 2 --precision fp32 bf16
    python bench/train_step.py --compile          # torch.compile each block (train.compile=true)
    python bench/train_step.py --presets XL --frames 16 --size 256 --patch 1 8 8 --batch 4 \\
        --zero 2 --precision bf16                 # 16×32×32 patches: the H200 record

One process, a world of one (`stages.train.init_distributed`). For each preset × frames × size × ZeRO
stage × precision: `DiffusionTrainer(cfg)` wrapped by `deepspeed.initialize` with the run's
`stages.train.parallelize.deepspeed_config`, then `engine(...)` → `engine.backward` → `engine.step` timed
per step (synchronized on CUDA). `--compile` sets `train.compile=true`, so `DiffusionTrainer` compiles
each transformer block exactly as training does (`stages.train.parallelize.apply_compile`); compilation
happens in the first warm-up step and is not timed. Batches are made on the device before the clock
starts, with byte text-encoder captions of exactly `text.max_length` tokens; no loader, no disk. Not
timed: batch creation and host→device copies, the EMA update, metrics and checkpoints.

Model FLOPs per step = 3 × forward FLOPs (`models.flops.forward_flops`, text.max_length text tokens)
× batch, the usual MFU basis: neither the byte text encoder nor activation recomputation is counted.
MFU = achieved ÷ --peak-tflops (989: H100/H200 dense bf16, meaningless on a CPU); `vs_matmul` =
achieved ÷ a matmul measured on the same device (bf16 8192³ on CUDA, fp32 2048³ on CPU).
This is a benchmark, never a test: numbers go to docs/PERFORMANCE.md with the machine and the command.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from report import print_table, record_header, sig, write_record

from configs import RunConfig, load_config
from configs.presets import MODEL_PRESETS
from models.attention import resolve_backend
from models.flops import forward_flops, parameter_count, token_grid
from stages.precision import DTYPES, torch_dtype
from stages.train import init_distributed
from stages.train.ops import prepare_builds
from stages.train.parallelize import deepspeed_config, lr_factor
from stages.train.trainer import DiffusionTrainer

CAPTION = "a slow pan over a harbour at dusk, boats rocking on the water, gulls overhead; "


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int, rounds: int = 5) -> float:
    """Median TFLOP/s of an n×n×n matmul in `dtype` on `device`: the attainable dense-math ceiling."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 2
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        rates.append(2 * n**3 * reps / (time.perf_counter() - start) / 1e12)
    return statistics.median(rates)


def run_config(
    preset: str, frames: int, size: int, zero: int, precision: str, args: argparse.Namespace
) -> RunConfig:
    """The RunConfig of one benchmark row (validated: a patch that does not divide the clip fails here)."""
    return load_config(
        overrides=[
            f"model.preset={preset}",
            f"model.patch_size=[{','.join(map(str, args.patch))}]",
            f"model.attention_backend={args.backend}",
            f"data.frames={frames}",
            f"data.height={size}",
            f"data.width={size}",
            f"data.batch_size={args.batch}",
            f"parallel.zero_stage={zero}",
            f"parallel.precision={precision}",
            f"parallel.activation_checkpointing={str(args.activation_checkpointing).lower()}",
            f"train.compile={str(args.compile).lower()}",
            *args.override,
        ]
    )


def synthetic_batches(cfg: RunConfig, device: torch.device, count: int = 2) -> list[dict[str, Any]]:
    """`count` training batches (pixels, times, noise, CFG drops, fps, captions) already on `device`."""
    d, dtype = cfg.data, torch_dtype(cfg.parallel.precision)
    gen = torch.Generator().manual_seed(0)
    shape = (d.batch_size, cfg.model.in_channels, d.frames, d.height, d.width)  # (B, C, T, H, W)
    length = cfg.text.max_length - 1  # + BOS = text.max_length tokens, as forward_flops counts
    batches = []
    for i in range(count):
        captions = [
            (f"{i}.{j} " + CAPTION * (1 + length // len(CAPTION)))[:length] for j in range(d.batch_size)
        ]
        batches.append(
            {
                "x0": torch.randn(shape, generator=gen).clamp(-1, 1).to(device, dtype),
                "t": torch.rand(d.batch_size, generator=gen).to(device),
                "noise": torch.randn(shape, generator=gen).to(device, dtype),
                "drop_text": (torch.rand(d.batch_size, generator=gen) < cfg.train.text_dropout).to(device),
                "fps": torch.full((d.batch_size,), float(d.fps), device=device),
                "captions": captions,
            }
        )
    return batches


def time_steps(cfg: RunConfig, device: torch.device, args: argparse.Namespace) -> tuple[list[float], int]:
    """Seconds of each timed optimizer step and the steps the engine skipped (fp16 overflow)."""
    import deepspeed

    torch.manual_seed(cfg.train.seed)
    module = DiffusionTrainer(cfg)
    ds_config = deepspeed_config(cfg, 1)
    prepare_builds(ds_config)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=[p for p in module.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, cfg.train.warmup_steps, cfg.train.steps)
        ),
        dist_init_required=False,
    )
    try:
        batches = synthetic_batches(cfg, device)
        times, skipped = [], 0
        for i in range(args.warmup + args.iters):
            b = batches[i % len(batches)]
            before = engine.skipped_steps
            _sync(device)
            start = time.perf_counter()
            loss = engine(
                b["x0"],
                b["t"],
                b["noise"],
                captions=b["captions"],
                text=None,
                text_mask=None,
                fps=b["fps"],
                drop_text=b["drop_text"],
            ).mean()
            engine.backward(loss)
            engine.step()
            _sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
                skipped += engine.skipped_steps - before
        return times, skipped
    finally:
        engine.destroy()
        del engine, module
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def measure(cfg: RunConfig, device: torch.device, ceiling: float, args: argparse.Namespace) -> dict:
    """One table row: step time, throughput, achieved TFLOP/s, MFU and peak device memory."""
    m, d, p = cfg.model, cfg.data, cfg.parallel
    grid = token_grid(m, d.frames, d.height, d.width)
    row: dict[str, Any] = {
        "preset": m.preset,
        "dit_params_M": round(parameter_count(m) / 1e6, 3),
        "patches": "×".join(map(str, grid)),
        "batch": d.batch_size,
        "zero": p.zero_stage,
        "precision": p.precision,
        "act_ckpt": "yes" if p.activation_checkpointing else "no",
        "compile": "yes" if cfg.train.compile else "no",
        "backend": resolve_backend(m.attention_backend, device),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        times, skipped = time_steps(cfg, device, args)
    except Exception as exc:  # e.g. out of memory, or a precision the device lacks: report, go on
        print(f"{row}: {type(exc).__name__}: {exc}", file=sys.stderr)
        error = "OOM" if isinstance(exc, torch.OutOfMemoryError) else f"failed ({type(exc).__name__})"
        keys = ("step_ms", "min_ms", "samples_per_s", "tokens_per_s", "TFLOPs", "MFU_989_%", "vs_matmul_%")
        return {**row, "step_ms": error, **{k: "-" for k in keys[1:]}, "peak_GiB": "-", "skips": "-"}
    step = statistics.median(times)
    flops = 3 * forward_flops(m, d.frames, d.height, d.width, cfg.text.max_length).total * d.batch_size
    achieved = flops / step / 1e12
    tokens = grid[0] * grid[1] * grid[2] * d.batch_size
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else "-"
    return {
        **row,
        "step_ms": round(step * 1e3, 2),
        "min_ms": round(min(times) * 1e3, 2),  # robust to other load on a shared machine
        "samples_per_s": round(d.batch_size / step, 2),
        "tokens_per_s": round(tokens / step),
        "TFLOPs": sig(achieved, 4),
        "MFU_989_%": sig(100 * achieved / args.peak_tflops),
        "vs_matmul_%": sig(100 * achieved / ceiling),
        "peak_GiB": peak if peak == "-" else round(peak, 2),
        "skips": skipped,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", choices=list(MODEL_PRESETS), default=["tiny"])
    parser.add_argument("--frames", type=int, nargs="+", default=[8], help="clip frames T")
    parser.add_argument("--size", type=int, nargs="+", default=[16], help="clip height = width")
    parser.add_argument("--patch", type=int, nargs=3, default=[1, 4, 4], help="pt ph pw")
    parser.add_argument("--batch", type=int, default=2, help="micro-batch per step")
    parser.add_argument("--zero", type=int, nargs="+", choices=[0, 1, 2, 3], default=[0])
    parser.add_argument("--precision", nargs="+", choices=list(DTYPES), default=["fp32"])
    parser.add_argument("--backend", choices=["auto", "xformers", "sdpa", "naive"], default="auto")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (train.compile)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100/H200 dense bf16")
    parser.add_argument("--matmul-size", type=int, help="n of the n³ ceiling matmul (8192 CUDA, 2048 CPU)")
    parser.add_argument("--override", nargs="*", default=[], help="extra dotted config overrides")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_step.json"))
    args = parser.parse_args()

    combos = itertools.product(args.presets, args.frames, args.size, args.zero, args.precision)
    configs = [run_config(*combo, args) for combo in combos]  # fail on a bad grid before any timing
    _, _, local = init_distributed()
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    matmul_dtype = "bf16" if device.type == "cuda" else "fp32"
    matmul_n = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    ceiling = matmul_ceiling(device, torch_dtype(matmul_dtype), matmul_n)
    print(f"{matmul_dtype} {matmul_n}³ matmul on {device}: {ceiling:.4f} TFLOP/s")

    rows = [measure(cfg, device, ceiling, args) for cfg in configs]
    print_table(rows)

    import deepspeed

    record = {
        **record_header("train_step", device, args, deepspeed=deepspeed.__version__),
        "matmul_ceiling": {"dtype": matmul_dtype, "n": matmul_n, "TFLOPs": round(ceiling, 4)},
        "peak_TFLOPs": args.peak_tflops,
        "rows": rows,
    }
    write_record(args.out, record)


if __name__ == "__main__":
    main()
