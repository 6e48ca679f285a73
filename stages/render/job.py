"""Offline rendering through a cascade (Imagen Video style): base → TSR → SSR → …, pipelined.

`render(cascade, prompts, settings)` samples every prompt through every stage; `upscale(...)` takes a
user's clip through the stages from one super-resolution stage on. Both check everything that can be
checked before any weights load (prompts, checkpoints, prompt lengths, existing outputs), then hand
the work to the scheduler (`stages.render.schedule`):

- prompts go through the stages in fixed batches of `render.batch_size`, pipelined, each stage served
  by a pool of replicas: `render.devices` split between the stages by their seconds per video
  (measured by an earlier render into the same folder, else estimated from FLOPs), one each by default;
- stages run behind a `StageExecutor`: `LocalExecutor` runs them in this process (tests, `--local`),
  `pipeline.ray_render` on pools of Ray actors;
- each stage's worker writes its outputs itself (`stages/{k:02d}-{stage}.safetensors`, `stages.render.
  worker`); the sidecar `video.json`, written last, marks a finished prompt;
- a prompt whose stage raises is recorded in `failures.jsonl` (prompt, stage, reason) and the others
  go on; `RenderSummary.failures` lists them, and the CLI exits non-zero.

Resume: a rerun skips prompts with a sidecar and continues the others from their last stage file.
Every stage file and sidecar carries a fingerprint of what made it (seed, prompt, checkpoint, stage
settings, upstream stage), so a rerun with other settings into the same directory fails with a message
instead of mixing outputs. Randomness is keyed by (prompt index, stage index) (see
`stages.render.stage`), and a batch keeps its prompts through every stage, so the same seed gives the
same videos bit for bit on CPU for the same batch size whatever the replicas (within float tolerance
for another batch size).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configs import CascadeConfig, RenderConfig, fingerprint, validate_cascade
from configs.validate import validate_render
from stages.atomic import remove_leftovers, write_text
from stages.folder_lock import folder_lock
from stages.render.output import (
    SIDECAR,
    load_input_video,
    prompt_dir,
    read_json,
    read_video_metadata,
    save_video_tensor,
    slugify,
    stage_path,
    tensor_digest,
    write_json,
)
from stages.render.plan import plan_cascade, split_replicas, video_flops
from stages.render.prompts import Prompt, check_prompts, prompt_label
from stages.render.schedule import ExecutorFactory, local_stage_executor, schedule
from stages.render.stage import StageSpec, check_prompt_lengths, prepare_stages
from stages.render.worker import INPUT_FILE, PromptJob, RenderContext, StageRecord, finalize

SUMMARY = "render.json"
FAILURES = "failures.jsonl"
"""One JSON line per prompt that failed in this run: index, prompt, stage, reason (empty: none)."""


# ---------------------------------------------------------------------------------------------------
# Fingerprints and resume
# ---------------------------------------------------------------------------------------------------


def _chain(specs: list[StageSpec], prompt: str, upstream: str) -> tuple[list[dict[str, Any]], list[str]]:
    settings, prints = [], []
    for spec in specs:
        entry = {"seed": spec.seed, "prompt": prompt, "stage": spec.record(), "upstream": upstream}
        upstream = fingerprint(entry)
        settings.append(entry)
        prints.append(upstream)
    return settings, prints


def _differences(stored: Any, expected: Any, path: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(expected, dict):
        out: list[str] = []
        for key in sorted(set(stored) | set(expected)):
            if key != "upstream":
                out += _differences(stored.get(key), expected.get(key), f"{path}.{key}" if path else key)
        return out
    if isinstance(stored, list) and isinstance(expected, list) and len(stored) == len(expected):
        return [
            d for i, (a, b) in enumerate(zip(stored, expected)) for d in _differences(a, b, f"{path}[{i}]")
        ]
    return [] if stored == expected else [f"{path}: {stored!r} now {expected!r}"]


def _mismatch(path: Path, stored: Any, expected: Any) -> ValueError:
    """The error for an output made with other settings, naming what changed (per stage for a sidecar)."""
    pairs = [(stored, expected)]
    if isinstance(stored, list) and isinstance(expected, list) and len(stored) == len(expected):
        pairs = list(zip(stored, expected))
    diffs: list[str] = []
    for old, new in pairs:
        for diff in _differences(old, new):
            if diff.startswith("stage.") and isinstance(new, dict):
                diff = f"stage '{new['stage']['name']}' {diff.removeprefix('stage.')}"
            if diff not in diffs:
                diffs.append(diff)
    diffs = diffs or ["an earlier stage or the input differs"]
    return ValueError(
        f"{path} was made with other settings ({'; '.join(diffs[:4])}); render into another --out "
        "directory, or delete it to redo it"
    )


def _resume(job: PromptJob, specs: list[StageSpec]) -> None:
    """Set job.next from the files a previous run left (raise on foreign outputs)."""
    sidecar = read_json(job.dir / SIDECAR)
    if sidecar is not None:
        if sidecar.get("fingerprint") != job.fingerprints[-1]:
            raise _mismatch(job.dir / SIDECAR, sidecar.get("settings"), job.settings)
        job.next, job.status = len(specs), "skipped (done before)"
        return
    for p, spec in enumerate(specs):
        path = stage_path(job.dir, spec.index, spec.name, ".safetensors")
        meta = read_video_metadata(path)
        if meta is None:
            break
        if meta.get("fingerprint") != job.fingerprints[p]:
            raise _mismatch(path, meta.get("settings"), job.settings[p])
        job.next = p + 1
    job.status = "rendered" if job.next == 0 else f"resumed after {specs[job.next - 1].name}"


# ---------------------------------------------------------------------------------------------------
# Running: replicas, progress, records
# ---------------------------------------------------------------------------------------------------


def stage_costs(specs: list[StageSpec], cascade: CascadeConfig, out: Path) -> tuple[list[float], str]:
    """Seconds (or FLOPs) per video of each stage, and where they come from: measured by an earlier
    render into `out` (its render.json, when it timed every one of these stages), else the plan's FLOPs."""
    earlier = read_json(out / SUMMARY) or {}
    timed = {s.get("name"): s for s in earlier.get("stages", []) if isinstance(s, dict)}
    measured = []
    for spec in specs:
        row = timed.get(spec.name) or {}
        prompts, seconds = row.get("prompts"), row.get("seconds")
        if not (
            isinstance(prompts, int) and prompts > 0 and isinstance(seconds, (int, float)) and seconds > 0
        ):
            break
        measured.append(seconds / prompts)
    if len(measured) == len(specs):
        return measured, f"measured ({out / SUMMARY})"
    rows = plan_cascade(cascade)
    return [video_flops(rows[s.index]) for s in specs], "estimated (FLOPs)"


def _replicas(jobs: list[PromptJob], specs: list[StageSpec], costs: list[float], devices: int) -> list[int]:
    """Replicas per stage position: none for stages every pending job is past, the device budget split
    by cost over the rest (one each when `devices` is 0)."""
    first = min(j.next for j in jobs)
    needed = len(specs) - first
    split = split_replicas(costs[first:], devices) if devices else [1] * needed
    return [0] * first + split


@dataclass
class _Progress:
    """Per stage: a bar (videos done, videos/hour, ETA) and the counts of the summary."""

    specs: list[StageSpec]
    replicas: list[int]
    jobs: list[PromptJob]
    enabled: bool
    stats: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    bars: list[Any] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        from tqdm.auto import tqdm

        self.stats = [
            {"name": s.name, "replicas": n, "prompts": 0, "failed": 0, "seconds": 0.0}
            for s, n in zip(self.specs, self.replicas)
        ]
        self.bars = [
            tqdm(
                total=len(self.jobs),
                initial=sum(j.next > p for j in self.jobs),
                desc=f"{spec.name} ×{n}",
                unit="video",
                position=p,
                disable=not self.enabled,
            )
            for p, (spec, n) in enumerate(zip(self.specs, self.replicas))
        ]

    def done(self, job: PromptJob, p: int, record: StageRecord) -> None:
        stats = self.stats[p]
        if record.status == "failed":
            stats["failed"] += 1
            stage = self.specs[p].name
            self.failures.append(
                {"index": job.index, "prompt": job.prompt, "stage": stage, "reason": record.reason}
            )
            job.status = f"failed at {stage}"
            for bar in self.bars[p:]:
                bar.total -= 1
                bar.refresh()
            return
        stats["prompts"] += 1
        stats["seconds"] += record.seconds
        bar = self.bars[p]
        bar.update(1)
        hours = (time.perf_counter() - self.start) / 3600
        if hours > 0:
            bar.set_postfix_str(f"{stats['prompts'] / hours:,.0f} videos/h")

    def close(self) -> None:
        for bar in self.bars:
            bar.close()


@dataclass
class RenderSummary:
    """What a render or upscale did."""

    out_dir: Path
    prompts: list[dict[str, Any]]
    """Per prompt: index, prompt, dir, status."""
    stages: list[dict[str, Any]]
    """Per stage run: name, replicas, prompts sampled in this run, failed, seconds (batch time shared by
    its prompts)."""
    failures: list[dict[str, Any]]
    """Per failed prompt: index, prompt, stage, reason (also in failures.jsonl)."""
    seconds: float
    start_seconds: float = 0.0
    """Of `seconds`, the time until every replica had loaded its weights."""

    def table(self) -> str:
        """A plain-text table of the prompts and the stages, for the end of the job."""
        lines = [f"{'prompt':<7} {'status':<24} dir"]
        lines += [f"{p['index']:<7} {p['status']:<24} {p['dir']}" for p in self.prompts]
        lines.append("")
        lines.append(
            f"{'stage':<16} {'replicas':>8} {'prompts':>7} {'failed':>6} {'s/video':>8} {'videos/h':>9}"
        )
        hours = self.seconds / 3600
        for s in self.stages:
            per_video = s["seconds"] / s["prompts"] if s["prompts"] else 0.0
            rate = s["prompts"] / hours if hours > 0 else 0.0
            lines.append(
                f"{s['name']:<16} {s['replicas']:>8} {s['prompts']:>7} {s['failed']:>6} {per_video:>8.2f} "
                f"{rate:>9.0f}"
            )
        lines.append(
            f"total {self.seconds:.1f} s ({self.start_seconds:.1f} s loading the replicas); outputs under "
            f"{self.out_dir}"
        )
        for f in self.failures:
            lines.append(f"FAILED prompt {f['index']} at {f['stage']}: {f['reason']}")
        if self.failures:
            lines.append(f"{len(self.failures)} prompts failed (listed in {self.out_dir / FAILURES})")
        return "\n".join(lines)


def _run(
    jobs: list[PromptJob],
    context: RenderContext,
    costs: tuple[list[float], str],
    executor: ExecutorFactory | None,
    progress: bool,
) -> RenderSummary:
    """Schedule the unfinished jobs on replicas split by `costs` (per stage seconds or FLOPs per video,
    and their source), write `render.json` and `failures.jsonl`, return the summary."""
    start = time.perf_counter()
    specs, settings = context.specs, context.settings
    out = Path(settings.out_dir)
    for job in jobs:  # every stage file but no sidecar (killed in between): finished here, no model loads
        if job.next == len(specs) and not job.status.startswith("skipped"):
            finalize(job, context)
    pending = [j for j in jobs if j.next < len(specs)]
    loaded = start
    replicas = _replicas(pending, specs, costs[0], settings.devices) if pending else [0] * len(specs)
    tracker = _Progress(specs, replicas, [j for j in jobs if not j.status.startswith("skipped")], progress)
    if pending:
        runner = (executor or local_stage_executor())(context)
        try:
            runner.start(replicas)
            loaded = time.perf_counter()
            schedule(pending, replicas, runner, settings.batch_size, tracker.done, window=2 * sum(replicas))
        finally:
            runner.close()
            tracker.close()
    summary = RenderSummary(
        out_dir=out,
        prompts=[{"index": j.index, "prompt": j.prompt, "dir": j.dir.name, "status": j.status} for j in jobs],
        stages=tracker.stats,
        failures=tracker.failures,
        seconds=time.perf_counter() - start,
        start_seconds=loaded - start,
    )
    write_text(out / FAILURES, "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in summary.failures))
    write_json(
        out / SUMMARY,
        {
            **context.header,
            "seed": settings.seed,
            "batch_size": settings.batch_size,
            "devices": settings.devices,
            "replica_costs": {"source": costs[1], "per_video": costs[0]},
            "precision": settings.precision,
            "prompts": summary.prompts,
            "stages": summary.stages,
            "failures": len(summary.failures),
            "seconds": summary.seconds,
            "start_seconds": summary.start_seconds,
        },
    )
    remove_leftovers(out)  # every file of this render is written: what a killed earlier render left
    return summary


# ---------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------


def render(
    cascade: CascadeConfig,
    prompts: Sequence[Prompt | str],
    settings: RenderConfig,
    *,
    cascade_file: str = "",
    executor: ExecutorFactory | None = None,
    progress: bool = False,
) -> RenderSummary:
    """Render every prompt through every stage into `settings.out_dir` (see the module docstring).

    Before any model loads: prompts are non-blank, every stage's checkpoint resolves and fits its stage,
    prompts fit every stage's text encoder, and existing outputs in the directory match these settings.
    `executor` defaults to `local_stage_executor()`; `pipeline.ray_render.ray_executor` runs on Ray.
    """
    prompts = [p if isinstance(p, Prompt) else Prompt(p) for p in prompts]
    validate_cascade(cascade)
    validate_render(settings)
    check_prompts(prompts)
    specs = prepare_stages(cascade, settings.seed, precision=settings.precision)
    check_prompt_lengths(
        specs, [p.text for p in prompts], [prompt_label(i, p) for i, p in enumerate(prompts)]
    )
    out = Path(settings.out_dir)
    with folder_lock(out, "render"):  # before reading what an earlier render left
        jobs = []
        for i, prompt in enumerate(prompts):
            stage_settings, prints = _chain(specs, prompt.text, "")
            job = PromptJob(i, prompt.text, prompt_dir(out, i, prompt.text), stage_settings, prints)
            _resume(job, specs)
            jobs.append(job)
        header = {"cascade": {"name": cascade.name, "file": cascade_file}}
        context = RenderContext(specs, settings, header)
        costs = ([1.0] * len(specs), "unused: one replica per stage")
        if settings.devices:
            costs = stage_costs(specs, cascade, out)
        return _run(jobs, context, costs, executor, progress)


def stage_index(cascade: CascadeConfig, name: str) -> int:
    """Index of the super-resolution stage `name`; ValueError listing the valid names otherwise."""
    names = [s.name for s in cascade.stages]
    valid = [s.name for s in cascade.stages[1:] if s.kind != "base"]
    if name not in names or cascade.stages[names.index(name)].kind == "base":
        what = "is the base stage" if name in names else "is not a stage of the cascade"
        raise ValueError(
            f"--from-stage {name!r} {what}; upscale starts at a super-resolution stage: "
            f"{', '.join(valid) or '(none in this cascade)'}"
        )
    return names.index(name)


def upscale(
    cascade: CascadeConfig,
    input_path: str | Path,
    from_stage: str,
    settings: RenderConfig,
    *,
    prompt: str = "",
    cascade_file: str = "",
    executor: ExecutorFactory | None = None,
    progress: bool = False,
) -> RenderSummary:
    """Take a user's clip through stages `from_stage`..last into `settings.out_dir/0000-{input name}/`.

    The clip is brought to the input shape of `from_stage` (the previous stage's output) by
    `load_input_video`. With an empty prompt every stage samples with guidance weight 1 (plain
    conditional model on the encoded empty prompt; no classifier-free guidance), since the SR models
    learnt the no-text case only through text dropout.
    """
    validate_cascade(cascade)
    validate_render(settings)
    first = stage_index(cascade, from_stage)
    if not isinstance(prompt, str):
        raise ValueError(f"--prompt: expected a string, got {type(prompt).__name__}")
    guidance = None if prompt.strip() else 1.0
    specs = prepare_stages(cascade, settings.seed, first, guidance, settings.precision)
    if prompt:
        check_prompt_lengths(specs, [prompt], ["--prompt"])
    prev = cascade.stages[first - 1]
    video = load_input_video(input_path, prev.frames, prev.height, prev.width, prev.fps)
    out = Path(settings.out_dir)
    digest = tensor_digest(video)
    stage_settings, prints = _chain(specs, prompt, digest)
    job_dir = out / f"0000-{slugify(Path(input_path).stem)}"
    job = PromptJob(0, prompt, job_dir, stage_settings, prints)
    header = {
        "cascade": {"name": cascade.name, "file": cascade_file},
        "input": {"path": str(input_path), "from_stage": from_stage, "digest": digest},
    }
    with folder_lock(out, "upscale"):  # before reading what an earlier upscale left
        _resume(job, specs)
        # the prepared clip, which the first stage's replica reads
        save_video_tensor(job_dir / "stages" / INPUT_FILE, video, {"digest": digest})
        context = RenderContext(specs, settings, header)
        return _run([job], context, ([1.0] * len(specs), "equal (one clip)"), executor, progress)
