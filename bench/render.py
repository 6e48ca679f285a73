"""Seconds per cascade stage and per video of offline rendering (`stages.render.render`), with untrained
checkpoints built from the cascade's own `model` blocks; prints a table and writes JSON.

    python bench/render.py              # CPU default: configs/cascade/demo.yaml, its steps, 2 videos, batch 1
    python bench/render.py --steps 4 --batch 2 --prompts 4
    python bench/render.py --precision bf16       # render.precision: stage models in bfloat16
    python bench/render.py --cascade configs/cascade/imagen_video.yaml --steps 4 --prompts 2   # H200
    python bench/render.py --prompts 12 --workers 1 2 3 4 --memory 24 240   # replica pools on Ray (CPU)
    python bench/render.py --split configs/cascade/imagen_video.yaml --split-gpus 8 64 512   # plan only
    python bench/render.py --compare runs/demo/pipeline/cascade-teacher.yaml runs/demo/pipeline/cascade.yaml

Checkpoints: for every stage, a freshly initialised DiT of the stage's `model` block (kind and
super-resolution factor from the stage) and a byte text encoder, written into a temporary directory as
the committed training checkpoints the renderer loads (`config.yaml`, `exported/` by
`stages.artifacts.export_weights`, the `COMMITTED` marker); nothing is downloaded. The text encoder is the
byte encoder at --text-width, and each model's text_dim is set to it: a cascade written for T5
embeddings (imagen_video: 4096) would need a local T5, and the text encoder, run once per prompt and
stage, is not what this measures. Untrained weights cost the same time as trained ones. The weights
are fp32: imagen_video.yaml's seven stages write about 12 GB (3 B parameters) into the temporary directory.

Timed: `render(cascade, prompts, RenderConfig(batch_size=--batch, no intermediate media, no contact
sheet))` with the local executor (stages one after another in this process, as `render --local`), after
an untimed warm-up render of one prompt at one step per stage (CUDA context, kernels, allocator).
Per stage: the renderer's own wall clock around `StageRunner.run` (text encoding, conditioning upsample,
every sampler step, each with classifier-free guidance when the stage's guidance weight is not 1) per
video and per step. Per video: the sum over the stages, and the whole render's wall clock ÷ videos, which
adds loading every stage's weights and writing the final mp4 and sidecars. Rendering runs on CUDA when
available, with the stage models in `--precision` (`render.precision`: fp32 default, or bf16; the
sampler state, text encoder and outputs stay float32).

Replicas (`--workers N ...`): the same prompts rendered on an in-process Ray with `render.devices=N`
CPU replicas split between the stages by cost (`render --workers N`), after the local render; per N the
split, the wall clock and videos/hour (the whole render's, loading included). `--memory P ...` renders
P prompts each on the first of --workers (at one sampler step per stage) and records the driver's peak
resident memory above its level at the start, sampled every 20 ms: with the outputs written by the
replicas it should not grow with P. `--split FILE --split-gpus N ...` prints the replica split the
planner gives FILE on N GPUs at `--tflops` achieved per GPU (no checkpoints, nothing rendered).
`--compare TEACHER STUDENT` renders --prompts synthetic captions through two cascade files with
their own trained checkpoints (a cascade and its distilled version): evaluations, seconds and prompt
checks per stage and video of each (`bench/render_compare.py`).
This is a benchmark, never a test: numbers go to docs/PERFORMANCE.md with the machine and the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, get_args

import torch
from render_compare import compare
from report import PeakRSS, print_table, record_header, write_record

from configs import CascadeConfig, DataConfig, RenderConfig, RunConfig, TextConfig, dump_config, load_cascade
from configs.cascade import stage_factor
from configs.schema import RenderPrecision
from configs.validate import validate
from models.dit import VideoDiT
from models.flops import token_grid
from models.text import ByteTextEncoder
from stages.artifacts import MARKER, export_weights, step_dir
from stages.render import RenderSummary, format_replica_plan, plan_cascade, plan_replicas, render

CAPTIONS = ["a red circle moving right", "a blue square moving up", "a green triangle", "waves at dusk"]


def build_checkpoints(cascade: CascadeConfig, root: Path, text_width: int) -> list[Path]:
    """One committed checkpoint of untrained weights per stage under `root/<stage>`; their step dirs."""
    steps = []
    for i, stage in enumerate(cascade.stages):
        prev = cascade.stages[i - 1] if i else None
        model = dataclasses.replace(stage.model, kind=stage.kind, text_dim=text_width)
        if prev is not None:
            model = dataclasses.replace(model, sr_factor=stage_factor(prev, stage))
        data = DataConfig(frames=stage.frames, height=stage.height, width=stage.width, fps=stage.fps or 8.0)
        cfg = RunConfig(model=model, text=TextConfig(width=text_width), data=data)
        validate(cfg)
        torch.manual_seed(i)
        modules = {"dit": VideoDiT(cfg.model), "text": ByteTextEncoder.from_config(cfg.text)}
        state = {f"{m}.{k}": v for m, module in modules.items() for k, v in module.state_dict().items()}
        step = step_dir(root / stage.name, 1)
        export_weights(step, cfg, {"ema": state})
        dump_config(cfg, step / "config.yaml")
        (step / MARKER).write_text("1\n")
        steps.append(step)
    return steps


def cascade_with(args: argparse.Namespace, checkpoints: list[Path], steps: int | None) -> CascadeConfig:
    """The cascade file with the built checkpoints, `steps` on every stage (None: the file's) and the
    user's overrides."""
    overrides = [f"stages.{i}.checkpoint={path}" for i, path in enumerate(checkpoints)]
    if steps is not None:
        overrides += [f"stages.{i}.steps={steps}" for i in range(len(checkpoints))]
    return load_cascade(args.cascade, [*overrides, *args.override])


def stage_rows(cascade: CascadeConfig, summary: RenderSummary) -> list[dict[str, Any]]:
    """Per stage: seconds per video and per step; then the sum per video and the render's wall clock."""
    rows: list[dict[str, Any]] = []
    for stage, stats in zip(cascade.stages, summary.stages):
        m, per_video = stage.model, stats["seconds"] / stats["prompts"]
        rows.append(
            {
                "stage": stage.name,
                "kind": stage.kind,
                "model": f"{m.preset or 'custom'} D={m.width} depth={m.depth}",
                "output": f"{stage.frames}×{stage.height}×{stage.width}",
                "tokens": math.prod(token_grid(m, stage.frames, stage.height, stage.width)),
                "steps": stage.steps,
                "cfg": "yes" if stage.guidance_scale != 1 else "no",
                "s_per_video": round(per_video, 3),
                "ms_per_step": round(1e3 * per_video / stage.steps, 2),
            }
        )
    sampling = sum(r["s_per_video"] for r in rows)
    for row in rows:
        row["share_%"] = round(100 * row["s_per_video"] / sampling, 1)
    blank = dict.fromkeys(rows[0], "-")
    wall = summary.seconds / len(summary.prompts)
    return [
        *rows,
        {**blank, "stage": "per video", "s_per_video": round(sampling, 3), "share_%": 100.0},
        {**blank, "stage": "wall / video", "s_per_video": round(wall, 3)},
    ]


def throughput_row(engine: str, workers: int | str, summary: RenderSummary) -> dict[str, Any]:
    """A render's split, wall clock, loading time and videos/hour (whole render, and after loading)."""
    videos = len(summary.prompts)
    return {
        "engine": engine,
        "workers": workers,
        "replicas": "/".join(str(s["replicas"]) for s in summary.stages),
        "prompts": videos,
        "wall_s": round(summary.seconds, 2),
        "load_s": round(summary.start_seconds, 2),
        "videos_per_hour": round(3600 * videos / summary.seconds),
        "after_load_per_hour": round(3600 * videos / (summary.seconds - summary.start_seconds)),
    }


def replica_rows(
    cascade: CascadeConfig, prompts: list[str], settings: dict, workers: list[int], scratch: Path
) -> list[dict[str, Any]]:
    """Per worker count: `throughput_row` of the render on an in-process Ray."""
    from pipeline.ray_render import ray_executor

    rows = []
    for n in workers:
        config = RenderConfig(out_dir=str(scratch / f"ray-{n}"), devices=n, device="cpu", **settings)
        rows.append(throughput_row("ray", n, render(cascade, prompts, config, executor=ray_executor())))
    return rows


def memory_rows(cascade: CascadeConfig, counts: list[int], settings: dict, workers: int, scratch: Path):
    """Per prompt count: the driver's peak resident memory above its start while rendering on Ray."""
    from pipeline.ray_render import ray_executor

    rows = []
    for count in counts:
        prompts = [f"{i}: {CAPTIONS[i % len(CAPTIONS)]}" for i in range(count)]
        config = RenderConfig(
            out_dir=str(scratch / f"mem-{count}"), devices=workers, device="cpu", **settings
        )
        with PeakRSS() as peak:
            summary = render(cascade, prompts, config, executor=ray_executor())
        rows.append(
            {
                "prompts": count,
                "workers": workers,
                "wall_s": round(summary.seconds, 2),
                "driver_start_mib": round(peak.start_mib, 1),
                "driver_peak_mib": round(peak.mib, 1),
                "driver_growth_mib": round(peak.mib - peak.start_mib, 1),
            }
        )
        shutil.rmtree(scratch / f"mem-{count}", ignore_errors=True)
    return rows


def split_record(path: Path, gpus: list[int], tflops: float) -> list[dict[str, Any]]:
    """The planner's replica split of the cascade file at `path` on each GPU count (printed)."""
    rows = plan_cascade(load_cascade(path))
    out = []
    for n in gpus:
        split = plan_replicas(rows, n, tflops)
        print(f"\n{path} on {n} GPUs\n{format_replica_plan(split, n, tflops)}")
        out.append({"gpus": n, "stages": split})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cascade", type=Path, default=Path("configs/cascade/demo.yaml"))
    parser.add_argument("--steps", type=int, default=0, help="sampler steps of every stage (0: the file's)")
    parser.add_argument("--batch", type=int, default=1, help="render.batch_size: prompts per stage batch")
    parser.add_argument("--prompts", type=int, default=2, help="videos rendered (timed)")
    parser.add_argument("--text-width", type=int, default=64, help="byte text encoder width = model.text_dim")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed one-step render")
    parser.add_argument(
        "--precision",
        choices=get_args(RenderPrecision),
        default=RenderConfig.precision,
        help="render.precision: dtype of the stage models",
    )
    parser.add_argument("--override", nargs="*", default=[], help="dotted cascade overrides")
    parser.add_argument(
        "--workers", type=int, nargs="*", default=[], help="CPU replica counts to render on Ray"
    )
    parser.add_argument(
        "--memory", type=int, nargs="*", default=[], help="prompt counts for the driver memory"
    )
    parser.add_argument("--split", type=Path, help="cascade file to split over --split-gpus (plan only)")
    parser.add_argument("--split-gpus", type=int, nargs="*", default=[8, 64, 512])
    parser.add_argument("--tflops", type=float, default=200.0, help="achieved TFLOP/s per GPU for --split")
    parser.add_argument(
        "--compare", nargs=2, metavar=("TEACHER", "STUDENT"), help="two trained cascade files"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/render.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = {
        "batch_size": args.batch,
        "save_intermediate": False,
        "contact_sheet": False,
        "precision": args.precision,
    }
    if args.compare:
        scratch = Path(tempfile.mkdtemp(prefix="tessera-bench-compare-"))
        try:
            result = compare(*map(Path, args.compare), args.prompts, settings, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        print_table(result["rows"])
        print("teacher ÷ student per video:", result["teacher_over_student"])
        write_record(args.out, {**record_header("render-compare", device, args), **result})
        return
    if args.split:
        record = {**record_header("render-split", torch.device("cpu"), args), "splits": []}
        record["splits"] = split_record(args.split, args.split_gpus, args.tflops)
        write_record(args.out, record)
        return
    load_cascade(args.cascade, args.override)  # fail on a bad file or override before building anything

    scratch = Path(tempfile.mkdtemp(prefix="tessera-bench-render-"))
    try:
        checkpoints = build_checkpoints(
            load_cascade(args.cascade, args.override), scratch / "ckpt", args.text_width
        )
        prompts = [f"{i}: {CAPTIONS[i % len(CAPTIONS)]}" for i in range(args.prompts)]
        if not args.no_warmup:
            render(
                cascade_with(args, checkpoints, 1),
                prompts[:1],
                RenderConfig(out_dir=str(scratch / "warm"), **settings),
            )
        cascade = cascade_with(args, checkpoints, args.steps or None)
        summary = render(cascade, prompts, RenderConfig(out_dir=str(scratch / "out"), **settings))
        replicas = replica_rows(cascade, prompts, settings, args.workers, scratch) if args.workers else []
        memory = []
        if args.memory:
            memory = memory_rows(
                cascade_with(args, checkpoints, 1),
                args.memory,
                settings,
                args.workers[0] if args.workers else 0,
                scratch,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    if summary.failures:
        first = summary.failures[0]
        sys.exit(f"{len(summary.failures)} failed, the first at {first['stage']}: {first['reason']}")
    rows = stage_rows(cascade, summary)
    print_table(rows)
    local = throughput_row("local", "-", summary)
    if replicas:
        print()
        print_table([local, *replicas])
    if memory:
        print()
        print_table(memory)

    record = {
        **record_header("render", device, args),
        "cascade": cascade.name,
        "render_seconds": round(summary.seconds, 3),
        "rows": rows,
        "replicas": [local, *replicas] if replicas else [],
        "memory": memory,
    }
    write_record(args.out, record)


if __name__ == "__main__":
    main()
