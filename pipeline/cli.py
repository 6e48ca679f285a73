"""Command line: `python -m pipeline COMMAND ...`.

Configs are given as YAML paths followed by dotted overrides (`model.depth=12`), in order.

Bad input (a config error, a missing file, a bad value, an output folder that is a file, a broken stage
graph, a corrupt checkpoint file) is one line on stderr and exit status 2; a full disk is one line and
exit status 1; Ctrl-C is "interrupted" and exit status 130. None prints a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_args, get_type_hints

from configs import (
    ConfigError,
    PipelineTrainingConfig,
    RenderConfig,
    RunConfig,
    SynthConfig,
    dump_config,
    fingerprint,
    load_config,
)
from configs.schema import RenderPrecision
from pipeline.graph import GraphError
from stages.atomic import NoSpaceLeft
from stages.folder_lock import FolderInUse, check_output_folder, folder_lock

PLAN_TFLOPS = 200.0
"""`render --plan --gpus N`'s default achieved TFLOP/s per device: an assumption (about a fifth of an
H100's or H200's dense bf16 peak), never a measurement; --tflops replaces it."""

OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=.*", re.DOTALL)
"""A `dotted.key=value` config override, as opposed to an input path."""

INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT, as shells report it)."""


def _interrupted() -> int:
    """Report Ctrl-C on one line; the exit status to return."""
    print("interrupted", file=sys.stderr)
    return INTERRUPTED


def _load(items: Sequence[str]) -> RunConfig:
    """YAML paths and key=value overrides, in the order given."""
    from pipeline.job import split_items

    return load_config(*split_items(items))


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    sys.stdout.write(dump_config(cfg))
    print(f"# fingerprint: {fingerprint(cfg)}")
    return 0


def _cmd_model_info(args: argparse.Namespace) -> int:
    from models.flops import forward_flops, parameter_count
    from stages.tables import key_value_table

    cfg = _load(args.config)
    d, m = cfg.data, cfg.model
    flops = forward_flops(m, d.frames, d.height, d.width, cfg.text.max_length)
    rows = [
        (
            "model",
            f"{m.kind}, width {m.width}, depth {m.depth}, heads {m.heads}, patch {tuple(m.patch_size)}",
        ),
        ("parameters", f"{parameter_count(m) / 1e6:.2f} M"),
        ("input", f"{d.frames}×{d.height}×{d.width} (T×H×W), {cfg.text.max_length} text tokens"),
        ("forward GFLOPs/sample", f"{flops.total / 1e9:.3f}"),
        *((f"  {name}", f"{value / 1e9:.3f}") for name, value in flops.as_dict().items() if name != "total"),
    ]
    print(key_value_table(rows))
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from stages.preprocess import (
        count_by_kind,
        discover,
        is_input,
        local_shard_executor,
        manifest_table,
        run_preprocess,
    )

    # an item on disk (or a glob matching something) is an input, even with a `=` in its name; else
    # `dotted.key=value` is an override
    inputs = [item for item in args.items if is_input(item) or not OVERRIDE.fullmatch(item)]
    overrides = [item for item in args.items if item not in inputs]
    if args.out:
        overrides.append(f"preprocess.out={args.out}")
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        items = discover(inputs)
        for item in items:
            print(f"{item.kind:<6} {item.id}" + (f"  [{item.error}]" if item.error else ""))
        for kind, count in count_by_kind(items).items():
            print(f"# {kind}: {count}")
        return 0
    check_output_folder(cfg.preprocess.out, "preprocess.out")
    if args.local:
        executor = local_shard_executor
    else:
        from pipeline.ray_preprocess import ray_executor

        executor = ray_executor(args.address)
    manifest = run_preprocess(cfg, inputs, executor=executor, progress=not args.quiet)
    print(manifest_table(manifest))
    print(f"wrote {cfg.preprocess.out}/manifest.json, failures.jsonl, lineage.jsonl")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from stages.synth import run_synth

    cfg = SynthConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig)})
    check_output_folder(args.out, "--out")
    summary = run_synth(Path(args.out), cfg, progress=not args.quiet)
    print(f"wrote {summary.videos} videos and {summary.images} images with captions to {summary.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    check_output_folder(cfg.train.out_dir, "train.out_dir")
    from stages.train import NonFiniteError

    failures: tuple[type[Exception], ...] = (NonFiniteError, NoSpaceLeft)
    if args.ray:
        from pipeline.ray_train import WorkersUnavailable

        failures = (*failures, WorkersUnavailable)
    try:
        if args.ray:
            from pipeline.ray_train import ray_train

            result = ray_train(
                cfg,
                resume=args.resume,
                address=args.address,
                workers=args.workers,
                min_workers=args.min_workers,
                cpus_per_worker=args.cpus_per_worker,
                gpus_per_worker=args.gpus_per_worker,
                wait_for_workers_s=args.wait_for_workers_s,
            )
        else:
            from stages.train import train

            result = train(cfg, resume=args.resume, progress=not args.quiet)
    except failures as err:
        print(f"error: {err}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:  # caught here so that a rank still leaves its process group below
        code = _interrupted()
    else:
        code = 0
        if getattr(result, "preempted", False):
            stop = f"stopped by SIGTERM at step {result.step}; checkpoint {result.checkpoint}"
            print(stop, file=sys.stderr)
    if args.ray:  # the driver; Ray Train owns its workers' process group
        return code
    from stages.train import leave_distributed

    return leave_distributed(code)


def _render_devices(args: argparse.Namespace) -> tuple[int, str]:
    """(render.devices, render.device) from --gpus / --workers."""
    if args.gpus is not None and args.workers is not None:
        raise ValueError("--gpus N (GPU replicas) or --workers N (CPU replicas), not both")
    if args.gpus is not None:
        return args.gpus, "cuda"
    if args.workers is not None:
        return args.workers, "cpu"
    return RenderConfig.devices, RenderConfig.device


def _render_settings(args: argparse.Namespace) -> RenderConfig:
    devices, device = _render_devices(args)
    if args.local and devices:
        raise ValueError("--local runs one replica per stage in this process; --gpus/--workers need Ray")
    return RenderConfig(
        out_dir=args.out,
        seed=args.seed,
        batch_size=args.batch_size,
        save_intermediate=not args.no_intermediate,
        contact_sheet=not args.no_sheet,
        precision=args.precision,
        devices=devices,
        device=device,
    )


def _render_executor(args: argparse.Namespace):
    if args.local:
        return None  # stages.render's default: every stage in this process
    from pipeline.ray_render import ray_executor

    return ray_executor(args.address)


def _finished(summary) -> int:
    """Print the summary table; 1 when any prompt failed (listed in failures.jsonl)."""
    print(summary.table())
    return 1 if summary.failures else 0


def _cmd_render(args: argparse.Namespace) -> int:
    from configs import load_cascade

    cascade = load_cascade(args.cascade, args.overrides)
    if args.plan:
        from stages.render import format_cascade_plan, format_replica_plan, plan_cascade, plan_replicas

        rows = plan_cascade(cascade, batch_size=args.batch_size)
        devices = _render_devices(args)[0]
        split = plan_replicas(rows, devices, args.tflops) if devices else None
        if args.json:
            print(json.dumps({"stages": rows, "replicas": split} if split else rows, indent=2))
        else:
            print(format_cascade_plan(rows))
            if split:
                print(f"\n{format_replica_plan(split, devices, args.tflops)}")
        return 0
    if args.json:
        raise ValueError("--json goes with --plan")
    if not args.out:
        raise ValueError("render needs --out DIR (or --plan to only print the plan)")
    if bool(args.prompts) == bool(args.prompt):
        raise ValueError("render needs either --prompts FILE or --prompt TEXT (repeatable), not both")
    check_output_folder(args.out, "--out")
    from stages.render import Prompt, read_prompts_file, render

    prompts = read_prompts_file(args.prompts) if args.prompts else [Prompt(text) for text in args.prompt]
    summary = render(
        cascade,
        prompts,
        _render_settings(args),
        cascade_file=str(args.cascade),
        executor=_render_executor(args),
        progress=not args.quiet,
    )
    return _finished(summary)


def _cmd_upscale(args: argparse.Namespace) -> int:
    from configs import load_cascade
    from stages.render import upscale

    cascade = load_cascade(args.cascade, args.overrides)
    check_output_folder(args.out, "--out")
    summary = upscale(
        cascade,
        args.input,
        args.from_stage,
        _render_settings(args),
        prompt=args.prompt,
        cascade_file=str(args.cascade),
        executor=_render_executor(args),
        progress=not args.quiet,
    )
    return _finished(summary)


def _cmd_run(args: argparse.Namespace) -> int:
    import time

    from pipeline.graph import Selection, format_run_plan, format_status, plan_graph, run_graph, status_rows
    from pipeline.job import PipelineJob, load_pipeline, split_items
    from stages.tables import format_duration

    paths, overrides = split_items(args.config)
    if args.out:
        overrides.append(f"out_dir={args.out}")
    cfg = load_pipeline(paths, overrides)
    check_output_folder(cfg.out_dir, "out_dir")
    job = PipelineJob(cfg, address=args.address, progress=not args.quiet)
    stages = job.stages()
    selection = Selection(only=tuple(args.only), from_=args.from_ or "", force=tuple(args.force))
    if args.plan:  # reads the run directory, writes nothing
        print(format_run_plan(stages, plan_graph(stages, job.out, selection)))
        return 0
    with folder_lock(job.out, "pipeline run"):  # before the plan reads the records another run writes
        plan = plan_graph(stages, job.out, selection)
        print(format_run_plan(stages, plan))
        job.write_config()
        capacity = job.start_ray(plan)
        started = time.monotonic()
        statuses = run_graph(stages, job.out, plan, capacity=capacity)
    print(f"\n{format_status(status_rows(job.out))}")
    failed = [name for name, state in statuses.items() if state == "failed"]
    took = format_duration(time.monotonic() - started)
    if failed:
        print(
            f"\nfailed: {', '.join(failed)} after {took}; fix and rerun the same command to resume",
            file=sys.stderr,
        )
        return 1
    report = job.out / "index.html"
    print(f"\nfinished in {took}" + (f"; open {report}" if report.exists() else ""))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from pipeline.graph import format_status, status_rows

    rows = status_rows(Path(args.run_dir))
    print(json.dumps(rows, indent=2) if args.json else format_status(rows))
    return 0


def _dataclass_options(p: argparse.ArgumentParser, cls: type) -> None:
    """One `--field-name` option per field of the flat dataclass `cls`, with its type, default and
    docstring (the values are checked where the config is used)."""
    from configs.reference import field_docs

    docs, types = field_docs(cls), get_type_hints(cls)
    for f in dataclasses.fields(cls):
        help_text = docs[f.name].replace("%", "%%") + " (default: %(default)s)"
        p.add_argument(f"--{f.name.replace('_', '-')}", type=types[f.name], default=f.default, help=help_text)


def _render_options(p: argparse.ArgumentParser) -> None:
    """Options shared by render and upscale."""
    p.add_argument("overrides", nargs="*", help="cascade overrides key=value (e.g. stages.1.steps=16)")
    p.add_argument("--cascade", required=True, help="cascade YAML (configs/cascade/*.yaml)")
    p.add_argument("--seed", type=int, default=RenderConfig.seed, help="sampling seed")
    p.add_argument(
        "--batch-size", type=int, default=RenderConfig.batch_size, help="prompts sampled together per stage"
    )
    p.add_argument("--no-intermediate", action="store_true", help="no mp4 for the earlier stages")
    p.add_argument("--no-sheet", action="store_true", help="no contact sheet")
    p.add_argument(
        "--precision",
        default=RenderConfig.precision,
        help=f"dtype of the stage models: {' or '.join(get_args(RenderPrecision))} (outputs stay float32)",
    )
    p.add_argument("--local", action="store_true", help="run every stage in this process (no Ray)")
    p.add_argument(
        "--gpus", type=int, help="GPUs for stage replicas, split between the stages by cost (render.devices)"
    )
    p.add_argument(
        "--workers", type=int, help="CPU actors for stage replicas, split by cost (render.devices)"
    )
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an in-process Ray)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _ray_train_options(p: argparse.ArgumentParser) -> None:
    """`train --ray`'s worker options, defaulting to a pipeline training's (`trainings.NAME`)."""
    training = PipelineTrainingConfig  # the defaults of a pipeline's trainings.NAME
    p.add_argument(
        "--workers",
        type=int,
        default=training.workers,
        help="Ray Train workers, one rank each (--ray; default %(default)s: pass --workers N for more)",
    )
    p.add_argument(
        "--min-workers",
        type=int,
        default=training.min_workers,
        help="elastic: after a failure continue with as few as this many workers, resuming at that world "
        "size (--ray; default %(default)s: always --workers)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=int,
        default=training.cpus_per_worker,
        help="CPUs (and threads) per worker (--ray; default %(default)s)",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=training.gpus_per_worker,
        help="GPUs per Ray Train worker (--ray; default %(default)s)",
    )
    p.add_argument(
        "--wait-for-workers-s",
        type=float,
        default=training.wait_for_workers_s,
        help="seconds a worker group may wait for its resources, then the run fails (--ray; %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: the commands' own options (render's --local) must not read as --local_rank
    parser = argparse.ArgumentParser(
        prog="python -m pipeline", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    # The DeepSpeed launcher starts `python -m pipeline --local_rank=N train ...`; LOCAL_RANK, which it
    # also sets, is what training reads (stages.train.init_distributed).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("config", help="print the resolved config as YAML with its fingerprint")
    p.add_argument("config", nargs="*", help="YAML files and key=value overrides, in order")
    p.set_defaults(func=_cmd_config)
    p = sub.add_parser("model-info", help="parameters and forward FLOPs of the configured model")
    p.add_argument("config", nargs="*", help="YAML files and key=value overrides, in order")
    p.set_defaults(func=_cmd_model_info)
    p = sub.add_parser("preprocess", help="videos/images → patch shards (Ray Data; --local without Ray)")
    p.add_argument(
        "items", nargs="+", help="inputs (folders, globs, .csv/.jsonl manifests, .tar) and key=value"
    )
    p.add_argument("--out", help="output directory (preprocess.out)")
    p.add_argument("--config", action="append", default=[], help="YAML overlay (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="list and count the inputs by kind; decode nothing")
    p.add_argument("--local", action="store_true", help="run without Ray (threads + decode processes)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an in-process Ray)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_preprocess)
    p = sub.add_parser("synth", help="write the synthetic captioned video/image dataset")
    p.add_argument("--out", required=True, help="output directory")
    _dataclass_options(p, SynthConfig)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)
    p = sub.add_parser("train", help="train: one process of a launcher's world, or --ray for Ray Train")
    p.add_argument("config", nargs="*", help="YAML files and key=value overrides, in order")
    p.add_argument(
        "--resume", default="auto", help="auto (newest committed checkpoint), none, or a directory"
    )
    p.add_argument("--ray", action="store_true", help="run the same worker function under Ray Train")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an in-process Ray)")
    _ray_train_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("render", help="render prompts through a cascade (replica pools on Ray; --local)")
    _render_options(p)
    p.add_argument("--prompts", help="prompts file: one per line, blank lines and # comments skipped")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--out", help="output directory (one folder per prompt; rerun to resume)")
    p.add_argument("--plan", action="store_true", help="print the stages' shapes and costs; load nothing")
    p.add_argument("--json", action="store_true", help="with --plan: print the rows as JSON")
    p.add_argument(
        "--tflops",
        type=float,
        default=PLAN_TFLOPS,
        help="with --plan --gpus N: TFLOP/s one device achieves, for the expected videos/hour (default: "
        "%(default)s, an assumption; measure it with bench/render.py)",
    )
    p.set_defaults(func=_cmd_render)
    p = sub.add_parser("upscale", help="take a clip through a cascade's super-resolution stages")
    p.add_argument("input", help="video (or image, for still cascades) to upscale")
    _render_options(p)
    p.add_argument("--from-stage", required=True, help="first stage to run (a tsr or ssr stage)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--prompt", default="", help="optional text; empty samples with guidance 1")
    p.set_defaults(func=_cmd_upscale)
    p = sub.add_parser(
        "run", help="the end-to-end job: synth/ingest → preprocess → train ∥ → render → report"
    )
    p.add_argument(
        "config", nargs="+", help="pipeline YAML files (configs/pipeline/*.yaml) and key=value overrides"
    )
    p.add_argument("--out", help="run directory (out_dir)")
    p.add_argument(
        "--only", action="append", default=[], help="run only this stage (repeatable; `train` = all)"
    )
    p.add_argument("--from", dest="from_", help="rerun this stage and everything after it")
    p.add_argument("--force", action="append", default=[], help="rerun this stage even if up to date")
    p.add_argument("--plan", action="store_true", help="print what would run and why; run nothing")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an in-process Ray)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("status", help="each stage of a pipeline run: state, time, outputs")
    p.add_argument("run_dir", help="the run directory (the pipeline's out_dir)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=_cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also follow the options (`preprocess IN --out DIR a.b=1`)
        names = [name for name in ("items", "config", "overrides") if hasattr(args, name)]
        target = names[0] if names else None
        if target is None or any("=" not in item or item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, target, getattr(args, target) + extra)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return _interrupted()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except NoSpaceLeft as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, GraphError, FolderInUse) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
