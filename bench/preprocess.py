"""Throughput of the preprocessing job against raw decord decoding of the same frames on the same cores.

    python bench/preprocess.py                       # synthetic dataset (144 videos, 64 frames, 256², 8 fps)
    python bench/preprocess.py --input ../shared/media --workers 1 2

For each worker count: the full job (discover → killable decode processes → resample/crop → patchify →
shards, local executor) and a raw baseline that only decodes, with decord `get_batch`, the frames the
job's clip plan asks for, spread over the same number of processes. Prints a table, writes JSON.
Interpreter imports (torch, which the job's patchify needs) happen before any timing. They happen
inside `main()`: the decode processes' fork server imports this script's module level, as it would
import any job's main script once.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np
from report import print_table, write_record

from configs import SynthConfig, load_config
from stages.media import ClipSpec, frames_to_decode, resample_indices
from stages.preprocess import discover, local_shard_executor, run_preprocess
from stages.synth import run_synth


def _raw_decode(args: tuple[str, ClipSpec]) -> int:
    """Decode with decord exactly the resampled frames the clip plan may use; returns frames decoded."""
    import decord

    path, spec = args
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        times = reader.get_frame_timestamp(range(len(reader)))[:, 0]
    except Exception:  # files decord cannot open are not part of the baseline
        return 0
    times = np.asarray(times, dtype=np.float64)
    if not (np.isfinite(times).all() and times[0] > -1 and (np.diff(times) >= 0).all()):
        return 0  # unusable timestamps: the job decodes such files with PyAV instead
    indices, _ = resample_indices(times, spec.fps)
    indices = indices[: frames_to_decode(len(indices), spec)]
    reader.get_batch(list(indices)).asnumpy()
    return len(indices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", help="folder of videos (default: a generated synthetic dataset)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--count", type=int, default=144, help="synthetic videos")
    parser.add_argument("--frames", type=int, default=64, help="frames per synthetic video (8 fps)")
    parser.add_argument("--size", type=int, default=256, help="side of the synthetic videos")
    parser.add_argument("--override", nargs="*", default=[], help="config overrides for the job")
    parser.add_argument("--out", type=Path, default=Path("bench/results/preprocess.json"))
    args = parser.parse_args()
    import torch  # noqa: F401  (the job's patchify needs it; interpreter imports are not timed)

    scratch = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
    try:
        source = args.input
        if source is None:
            source = str(scratch / "synth")
            synth = SynthConfig(
                count=args.count, frames=args.frames, size=args.size, fps=8.0, image_fraction=0.0
            )
            run_synth(Path(source), synth, progress=False)
        videos = [item.path for item in discover([source]) if item.kind == "video" and not item.member]
        rows = []
        for workers in args.workers:
            out = scratch / f"job-{workers}"
            cfg = load_config(
                overrides=[
                    "data.frames=8",
                    "data.height=32",
                    "data.width=32",
                    "data.fps=8",
                    "model.patch_size=[1,4,4]",
                    f"preprocess.out={out}",
                    f"preprocess.workers={workers}",
                    *args.override,
                ]
            )
            spec = ClipSpec.from_config(cfg)
            start = time.perf_counter()
            manifest = run_preprocess(cfg, videos, executor=local_shard_executor, progress=False)
            job_s = time.perf_counter() - start
            frames = sum(int(shape.split("x")[0]) * n for shape, n in manifest["shapes"].items())

            start = time.perf_counter()
            with ProcessPoolExecutor(workers) as pool:
                raw_frames = sum(pool.map(_raw_decode, [(v, spec) for v in videos]))
            raw_s = time.perf_counter() - start
            rows.append(
                {
                    "workers": workers,
                    "files": len(videos),
                    "clips": manifest["samples"],
                    "job_clips_per_s": round(manifest["samples"] / job_s, 2),
                    "job_frames_per_s": round(frames / job_s, 1),
                    "raw_decoded_frames": raw_frames,
                    "raw_frames_per_s": round(raw_frames / raw_s, 1),
                    "job_vs_raw": round((frames / job_s) / (raw_frames / raw_s), 3) if raw_frames else None,
                }
            )
            shutil.rmtree(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print_table(rows)
    record = {
        "benchmark": "preprocess",
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}",
        "command": " ".join(sys.argv),
        "input": args.input
        or f"synthetic: {args.count} videos, {args.frames} frames, {args.size}x{args.size}, 8 fps",
        "rows": rows,
    }
    write_record(args.out, record)


if __name__ == "__main__":
    main()
