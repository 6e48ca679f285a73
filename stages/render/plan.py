"""What rendering a cascade will cost, stage by stage, without loading any weights (`render --plan`).

Each stage's model config comes from its checkpoint's `config.yaml` when the checkpoint is committed,
else from the stage's `model` block (with the stage's kind and factor). Counts per stage: parameters,
patch tokens, forward FLOPs per sampling step (models/flops.py; doubled under classifier-free guidance,
which runs a conditional and an unconditional pass), FLOPs of the whole stage, and a rough memory
estimate (see `memory_bytes`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from configs import (
    CascadeConfig,
    CascadeStageConfig,
    ModelConfig,
    RunConfig,
    check_stage_model,
    load_config,
    network_passes,
    stage_factor,
    stage_sampling,
    validate_cascade,
)
from models.flops import forward_flops, parameter_count, token_grid
from stages.artifacts import resolve_committed

BYTES_FP32 = 4


def _committed_run(path: str, what: str) -> tuple[RunConfig, Path] | None:
    """A committed checkpoint's run config and step directory, or None while there is none."""
    if not path:
        return None
    try:
        step = resolve_committed(path, what)
    except FileNotFoundError:
        return None  # not trained yet
    return load_config([step / "config.yaml"]), step


def _stage_model(cascade: CascadeConfig, index: int, factor: int) -> tuple[RunConfig, str]:
    """(run config, source) of what stage `index` samples with: its committed distilled checkpoint, else
    its committed checkpoint, else a run config holding the stage's `model` block."""
    stage = cascade.stages[index]
    found = _committed_run(stage.distilled, f"stage '{stage.name}' distilled") or _committed_run(
        stage.checkpoint, f"stage '{stage.name}' checkpoint"
    )
    if found is None:
        sr_factor = stage.model.sr_factor if stage.kind == "base" else factor  # unused by a base model
        return RunConfig(
            model=dataclasses.replace(stage.model, kind=stage.kind, sr_factor=sr_factor)
        ), "config"
    run, step = found
    check_stage_model(cascade, index, run.model, f"stage '{stage.name}' (checkpoint {step})")
    return run, str(step)


def _sampling_cost(stage: CascadeStageConfig, run: RunConfig) -> dict[str, Any]:
    """Steps, passes per step and forward FLOPs per step of `stage` sampling the model of `run`."""
    settings = stage_sampling(stage, run)
    passes = network_passes(stage, run.model)
    forward = forward_flops(run.model, stage.frames, stage.height, stage.width, run.text.max_length).total
    return {**settings, "passes": passes, "flops_per_step": passes * forward}


def memory_bytes(model: ModelConfig, params: int, grid: tuple[int, int, int], batch: int) -> int:
    """Rough peak memory of one sampling forward of `batch` videos (already doubled for guidance).

    fp32 weights (4·P bytes) plus the peak activations of one transformer block, sampling keeping no
    autograd state: the residual stream and its normalized copy (2·N·D), plus the larger of the MLP
    hidden (N·mlp_ratio·D) and q, k, v and the attention output (4·N·D), all fp32, for N = T'·H'·W'
    tokens per video. Attention is assumed to run in fused kernels (xformers / SDPA flash or
    memory-efficient, what `auto` picks on GPUs), which never hold a score matrix; with
    `attention_backend: naive` the largest score matrix of one kernel call is added: heads·S² per frame
    for spatial attention, heads·T'² per position for temporal, over at most `attention_max_batch` rows.
    The text encoder, the sampler's few copies of the video and allocator overhead are not counted.
    """
    tp, hp, wp = grid
    s, n, d = hp * wp, tp * hp * wp, model.width
    block = batch * n * (2 * d + max(int(d * model.mlp_ratio), 4 * d))
    scores = 0
    if model.attention_backend == "naive":
        spatial = min(batch * tp, model.attention_max_batch) * s * s
        temporal = min(batch * s, model.attention_max_batch) * tp * tp if model.temporal_layers else 0
        scores = model.heads * max(spatial, temporal)
    return BYTES_FP32 * (params + block + scores)


def plan_cascade(cascade: CascadeConfig, batch_size: int = 1) -> list[dict[str, Any]]:
    """One JSON-serializable row per stage: shapes, sampler settings, model source and size, tokens,
    steps and passes, FLOPs and memory for rendering `batch_size` videos; a stage with a committed
    distilled checkpoint also gets its teacher's steps, passes and FLOPs (`teacher`). No weights load."""
    validate_cascade(cascade)
    rows: list[dict[str, Any]] = []
    prev: CascadeStageConfig | None = None
    for index, stage in enumerate(cascade.stages):
        factor = stage_factor(prev, stage)
        run, source = _stage_model(cascade, index, factor)
        model = run.model
        grid = token_grid(model, stage.frames, stage.height, stage.width)  # patches checked on loading
        cost = _sampling_cost(stage, run)
        params = parameter_count(model)
        row = {
            "name": stage.name,
            "kind": stage.kind,
            "factor": factor,
            "input": None
            if prev is None
            else {"frames": prev.frames, "height": prev.height, "width": prev.width, "fps": prev.fps},
            "frames": stage.frames,
            "height": stage.height,
            "width": stage.width,
            "fps": stage.fps,
            **cost,
            "checkpoint": stage.checkpoint,
            "model_source": source,
            "parameters": params,
            "tokens": grid[0] * grid[1] * grid[2],
            "flops": cost["flops_per_step"] * cost["steps"] * batch_size,
            "memory_gib": memory_bytes(model, params, grid, batch_size * cost["passes"]) / 2**30,
        }
        teacher = (
            _committed_run(stage.checkpoint, f"stage '{stage.name}' checkpoint")
            if run.distill.teacher
            else None
        )
        if teacher is not None:
            own = _sampling_cost(stage, teacher[0])
            row["teacher"] = {
                "steps": own["steps"],
                "passes": own["passes"],
                "flops": own["flops_per_step"] * own["steps"] * batch_size,
            }
        rows.append(row)
        prev = stage
    return rows


def format_distillation(rows: list[dict[str, Any]]) -> str:
    """One line per distilled stage: its steps × passes against its teacher's, and the FLOPs saved."""
    lines = []
    for row in rows:
        teacher = row.get("teacher")
        if teacher is None:
            continue
        evals, before = row["steps"] * row["passes"], teacher["steps"] * teacher["passes"]
        lines.append(
            f"distilled {row['name']}: {row['steps']} steps × {row['passes']} pass(es) = {evals} network "
            f"evaluations against its teacher's {teacher['steps']} × {teacher['passes']} = {before} "
            f"({before / evals:.1f}× fewer); {(teacher['flops'] - row['flops']) / 1e9:,.1f} GFLOPs saved"
        )
    if lines:
        total = sum(r.get("teacher", r)["flops"] for r in rows)
        now = sum(r["flops"] for r in rows)
        undistilled = f"{total / 1e9:,.1f} GFLOPs undistilled"
        lines.append(f"the cascade: {now / 1e9:,.1f} GFLOPs against {undistilled} ({total / now:.1f}×)")
    return "\n".join(lines)


def _shape(d: dict[str, Any]) -> str:
    return f"{d['frames']}×{d['height']}×{d['width']}@{d['fps']:g}"


def _guidance(row: dict[str, Any]) -> str:
    if row["guidance_schedule"] == "oscillating":
        return f"{row['guidance_scale']:g}/{row['guidance_low']:g} osc"
    return f"{row['guidance_scale']:g}"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def format_cascade_plan(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of `plan_cascade` rows plus a total line (memory total = every stage resident
    at once, as in the pipelined renderer with one replica per stage), then `format_distillation`'s lines."""
    header = ("stage", "kind", "input → output (T×H×W@fps)", "steps", "passes", "guidance", "params")
    header += ("GFLOPs", "GiB")
    table = [header]
    for row in rows:
        source = "-" if row["input"] is None else _shape(row["input"])
        kind = row["kind"] if row["kind"] == "base" else f"{row['kind']}×{row['factor']}"
        table.append(
            (
                row["name"],
                kind,
                f"{source} → {_shape(row)}",
                str(row["steps"]),
                str(row["passes"]),
                _guidance(row),
                _count(row["parameters"]),
                f"{row['flops'] / 1e9:,.1f}",
                f"{row['memory_gib']:.2f}",
            )
        )
    table.append(
        (
            "total",
            "",
            "",
            str(sum(r["steps"] for r in rows)),
            "",
            "",
            _count(sum(r["parameters"] for r in rows)),
            f"{sum(r['flops'] for r in rows) / 1e9:,.1f}",
            f"{sum(r['memory_gib'] for r in rows):.2f}",
        )
    )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    left = {0, 1, 2, 5}

    def fmt(line: tuple[str, ...]) -> str:
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    distilled = format_distillation(rows)
    lines = [fmt(table[0]), rule, *(fmt(line) for line in table[1:-1]), rule, fmt(table[-1])]
    return "\n".join(lines + ([distilled] if distilled else []))


# ---------------------------------------------------------------------------------------------------
# Replicas: a device budget split between the stages
# ---------------------------------------------------------------------------------------------------


def video_flops(row: dict[str, Any]) -> float:
    """FLOPs of one video at a `plan_cascade` row's stage (every sampling step, guidance included)."""
    return row["flops_per_step"] * row["steps"]


def split_replicas(costs: list[float], devices: int) -> list[int]:
    """Replicas per stage for `devices` devices, given each stage's seconds (or FLOPs) per video.

    Every stage gets one; each further device goes to the stage whose time per video per replica is
    the largest, which minimises the slowest stage's time (the pipeline's throughput is set by it).
    With no more devices than stages every stage has one replica (they share the devices).
    """
    if not costs:
        return []
    if any(c < 0 for c in costs):
        raise ValueError(f"stage costs must be >= 0, got {costs}")
    replicas = [1] * len(costs)
    for _ in range(max(0, devices - len(costs))):
        slowest = max(range(len(costs)), key=lambda k: costs[k] / replicas[k])
        replicas[slowest] += 1
    return replicas


def videos_per_hour(seconds: list[float], replicas: list[int]) -> float:
    """Steady-state throughput of the pipelined stages: the slowest stage's replicas ÷ its seconds per
    video (each replica busy with one video at a time; loading and the pipeline's fill not counted)."""
    rates = [n / s for s, n in zip(seconds, replicas, strict=True) if s > 0]
    return 3600.0 * min(rates) if rates else float("inf")


def plan_replicas(rows: list[dict[str, Any]], devices: int, tflops: float) -> list[dict[str, Any]]:
    """The device split of `plan_cascade` rows (their FLOPs per video) at `tflops` TFLOP/s achieved per
    device: per stage its replicas and estimated seconds per video; the expected videos/hour and the
    bottleneck stage are in every row (`pipeline_videos_per_hour`, `bottleneck`)."""
    costs = [video_flops(row) for row in rows]
    replicas = split_replicas(costs, devices)
    seconds = [c / (tflops * 1e12) for c in costs]
    rate = videos_per_hour(seconds, replicas)
    if 0 < devices < len(rows):  # one replica per stage, sharing the devices
        rate = 3600.0 * devices / sum(seconds)
    bottleneck = min(range(len(rows)), key=lambda k: replicas[k] / seconds[k] if seconds[k] else float("inf"))
    return [
        {
            "name": row["name"],
            "replicas": n,
            "seconds_per_video": s,
            "stage_videos_per_hour": 3600.0 * n / s if s else float("inf"),
            "pipeline_videos_per_hour": rate,
            "bottleneck": rows[bottleneck]["name"],
        }
        for row, n, s in zip(rows, replicas, seconds)
    ]


def format_replica_plan(split: list[dict[str, Any]], devices: int, tflops: float) -> str:
    """The replica split as a table, with the expected throughput and its assumption."""
    lines = [f"{'stage':<16} {'replicas':>8} {'s/video':>10} {'videos/h':>10}"]
    for row in split:
        lines.append(
            f"{row['name']:<16} {row['replicas']:>8} {row['seconds_per_video']:>10.2f} "
            f"{row['stage_videos_per_hour']:>10.0f}"
        )
    first = split[0] if split else {"pipeline_videos_per_hour": 0.0, "bottleneck": "-"}
    lines.append(
        f"{devices} devices: {first['pipeline_videos_per_hour']:,.0f} videos/hour, bound by "
        f"{first['bottleneck']} (estimate at {tflops:g} TFLOP/s achieved per device, --tflops)"
    )
    return "\n".join(lines)
