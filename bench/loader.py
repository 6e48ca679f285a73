"""Samples/s of the shard loader against what the training step consumes, and the data wait of the real
trainer as a share of its step time (target ≤ 5 %); prints a table and a verdict, writes JSON.

    python bench/loader.py                        # CPU default: tiny, 8×32×32 px, patch (1, 4, 4), batch 4
    python bench/loader.py --preset XL --frames 16 --size 256 --patch 1 8 8 --batch 2 --precision bf16 \\
        --workers 0 2 4 8 --count 64 --synth-frames 64 --synth-size 256      # 16×32×32 patches: H200

Data: real shards written into a temporary directory by `stages.synth.run_synth` (H.264 videos with
captions) and `stages.preprocess.run_preprocess`, as `bench/preprocess.py` does. For each
`data.num_workers` in --workers:

- loader: `stages.shards.loader.loader_from_config`, the trainer's loader, drawing batches in this process
  exactly as the trainer does (`next(batches)` then `stages.train.batches.fit_batch`), nothing else running;
  samples/s over --batches batches after --warmup batches (worker start-up not timed);
- trainer: `stages.train.train` itself, reading the same shards, for 2 × --iters steps with
  `train.log_every` = --iters; samples/s and `data_wait_frac` (the trainer's own measure: seconds in
  `fit_batch(next(batches))` ÷ step time) of the second window of its metrics log (the first, with
  worker start-up and warm-up, is dropped). Its final checkpoint save comes after the window.

Once: the step alone, `bench/train_step.time_steps` (the DeepSpeed engine step on synthetic batches
already on the device, no loader): the rate the step consumes. `headroom` = loader ÷ step samples/s.
Verdict: the loader keeps up where the trainer's data wait is ≤ --target-wait %. On a CPU, the
loader's worker processes share the cores with the step: the measure is the CPU machine's, not a GPU's.
torch, DeepSpeed and the trainer are imported inside the functions, as in `bench/preprocess.py`: the
preprocessing job's decode processes import this script's module level. The trainer runs write full
checkpoints at their end (outside the measured window; for XL about 25 GB each, deleted after each run).
This is a benchmark, never a test: numbers go to docs/PERFORMANCE.md with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from report import print_table, record_header, write_record

from configs import RunConfig, SynthConfig, load_config
from configs.presets import MODEL_PRESETS
from stages.preprocess import run_preprocess
from stages.synth import run_synth


def run_config(args: argparse.Namespace, shards: Path, workers: int, out_dir: Path) -> RunConfig:
    """The run config of the benchmark at `workers` loader workers (also the shards' clip geometry)."""
    return load_config(
        overrides=[
            f"model.preset={args.preset}",
            f"model.patch_size=[{','.join(map(str, args.patch))}]",
            f"data.frames={args.frames}",
            f"data.height={args.size}",
            f"data.width={args.size}",
            "data.fps=8",
            f"data.batch_size={args.batch}",
            f"data.shards={shards}",
            f"data.num_workers={workers}",
            f"parallel.precision={args.precision}",
            f"preprocess.out={shards}",
            f"preprocess.files_per_shard={args.files_per_shard}",
            f"train.out_dir={out_dir}",
            f"train.steps={2 * args.iters}",
            f"train.log_every={args.iters}",
            f"train.checkpoint_every={2 * args.iters}",
            "train.keep_checkpoints=1",
            *args.override,
        ]
    )


def loader_rate(cfg: RunConfig, args: argparse.Namespace) -> float:
    """Samples/s of the trainer's loader (+ fit_batch) alone, after `args.warmup` batches."""
    import torch

    from stages.shards.loader import loader_from_config
    from stages.train.batches import fit_batch

    gen = torch.Generator().manual_seed(0)
    batches = iter(loader_from_config(cfg, rank=0, world_size=1))
    try:
        for _ in range(args.warmup):
            fit_batch(next(batches), cfg, gen)
        samples, start = 0, time.perf_counter()
        for _ in range(args.batches):
            samples += fit_batch(next(batches), cfg, gen).x.shape[0]
        return samples / (time.perf_counter() - start)
    finally:
        batches.close()  # stops the DataLoader workers


def trainer_window(cfg: RunConfig) -> dict[str, float]:
    """samples/s and data-wait fraction of the real trainer's last metrics window."""
    from stages.train import METRICS_FILE, train

    train(cfg, resume="none", progress=False)
    lines = (Path(cfg.train.out_dir) / METRICS_FILE).read_text().splitlines()
    last = json.loads(lines[-1])
    return {"samples_per_s": last["samples_per_s"], "data_wait_frac": last["data_wait_frac"]}


def step_rate(cfg: RunConfig, args: argparse.Namespace) -> float:
    """Samples/s the training step consumes: bench/train_step.time_steps on synthetic device batches."""
    import torch
    from train_step import time_steps

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    times, _ = time_steps(cfg, device, argparse.Namespace(warmup=args.warmup, iters=args.iters))
    return cfg.data.batch_size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(MODEL_PRESETS), default="tiny")
    parser.add_argument("--frames", type=int, default=8, help="clip frames T")
    parser.add_argument("--size", type=int, default=32, help="clip height = width")
    parser.add_argument("--patch", type=int, nargs=3, default=[1, 4, 4], help="pt ph pw")
    parser.add_argument("--batch", type=int, default=4, help="micro-batch per step")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="data.num_workers")
    parser.add_argument("--count", type=int, default=24, help="synthetic videos")
    parser.add_argument("--synth-frames", type=int, default=32, help="frames per synthetic video (8 fps)")
    parser.add_argument("--synth-size", type=int, default=64, help="side of the synthetic videos")
    parser.add_argument("--files-per-shard", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches / steps")
    parser.add_argument("--batches", type=int, default=50, help="timed loader batches")
    parser.add_argument("--iters", type=int, default=10, help="timed steps (the trainer runs 2×)")
    parser.add_argument("--target-wait", type=float, default=5.0, help="data wait %% of step time")
    parser.add_argument("--override", nargs="*", default=[], help="extra dotted config overrides")
    parser.add_argument("--out", type=Path, default=Path("bench/results/loader.json"))
    args = parser.parse_args()
    import torch  # not at module level (see the docstring); interpreter imports are not timed

    from stages.train import init_distributed

    scratch = Path(tempfile.mkdtemp(prefix="tessera-bench-loader-"))
    try:
        shards = scratch / "shards"
        cfg = run_config(args, shards, 0, scratch / "run")  # fails on a bad geometry before any work
        synth = SynthConfig(
            count=args.count, frames=args.synth_frames, size=args.synth_size, fps=8.0, image_fraction=0.0
        )
        run_synth(scratch / "synth", synth, progress=False)
        manifest = run_preprocess(cfg, [str(scratch / "synth")], progress=False)
        print(f"shards: {manifest['samples']} clips in {len(list(shards.glob('shards/*.tar')))} shards")
        init_distributed()  # a world of one, as bench/train_step.py
        step = step_rate(cfg, args)
        rows = []
        for workers in args.workers:
            cfg = run_config(args, shards, workers, scratch / f"run-{workers}")
            loader = loader_rate(cfg, args)
            trainer = trainer_window(cfg)
            shutil.rmtree(cfg.train.out_dir, ignore_errors=True)
            wait = 100 * trainer["data_wait_frac"]
            rows.append(
                {
                    "workers": workers,
                    "loader_samples_per_s": round(loader, 1),
                    "step_samples_per_s": round(step, 1),
                    "headroom": round(loader / step, 2),
                    "trainer_samples_per_s": round(trainer["samples_per_s"], 1),
                    "data_wait_%": round(wait, 2),
                    "verdict": "ok" if wait <= args.target_wait else "loader-bound",
                }
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print_table(rows)
    good = [r["workers"] for r in rows if r["verdict"] == "ok"]
    verdict = (
        f"data wait ≤ {args.target_wait:g} % of step time with data.num_workers in {good}"
        if good
        else f"the loader is the bottleneck (data wait > {args.target_wait:g} %) at every worker count tried"
    )
    print(f"verdict: {verdict}")

    import deepspeed

    record = {
        **record_header(
            "loader",
            torch.device("cuda" if torch.cuda.is_available() else "cpu"),
            args,
            deepspeed=deepspeed.__version__,
        ),
        "dataset": {"videos": args.count, "clips": manifest["samples"]},
        "rows": rows,
        "verdict": verdict,
    }
    write_record(args.out, record)


if __name__ == "__main__":
    main()
