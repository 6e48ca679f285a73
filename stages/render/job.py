"""Offline rendering through a cascade (Imagen Video style): base → TSR → SSR → …, pipelined.

`render(cascade, prompts, settings)` samples every prompt through every stage; `upscale(...)` takes a
user's clip through the stages from one super-resolution stage on. Both check everything that can be
checked before any weights load (prompts, checkpoints, prompt lengths, existing outputs), then hand
the work to a small scheduler:

- every stage has a queue of prompts waiting for it; an idle stage takes up to `render.batch_size` of
  them as one batch, so different prompts occupy different stages at once;
- stages run behind a `StageExecutor`: `LocalExecutor` runs them in this process (tests, `--local`),
  `pipeline.ray_render` runs one Ray actor per stage and overlaps them;
- each finished stage output is written at once (`stages/{k:02d}-{stage}.safetensors`); the sidecar
  `video.json`, written last, marks a finished prompt.

Resume: a rerun skips prompts with a sidecar and continues the others from their last stage file.
Every stage file and sidecar carries a fingerprint of what made it (seed, prompt, checkpoint, stage
settings, upstream stage), so a rerun with other settings into the same directory fails with a message
instead of mixing outputs. Randomness is keyed by (prompt index, stage index) (see
`stages.render.stage`), so the same seed gives the same videos whatever the batching (bitwise on CPU
for the same batch size, within float tolerance otherwise).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from configs import CascadeConfig, RenderConfig, fingerprint, validate_cascade
from configs.validate import validate_render
from stages.atomic import remove_leftovers
from stages.folder_lock import folder_lock
from stages.media import contact_sheet
from stages.render.output import (
    SIDECAR,
    load_input_video,
    load_video_tensor,
    prompt_dir,
    read_json,
    read_video_metadata,
    save_video_tensor,
    slugify,
    stage_path,
    tensor_digest,
    video_frames,
    write_json,
    write_media,
)
from stages.render.prompts import Prompt, check_prompts, prompt_label
from stages.render.schedule import ExecutorFactory, PromptJob, local_stage_executor, schedule
from stages.render.stage import StageSpec, check_prompt_lengths, prepare_stages

SUMMARY = "render.json"


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
    """Set job.next / job.video from the files a previous run left (raise on foreign outputs)."""
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
    if job.next > 0:
        last = specs[job.next - 1]
        job.video = load_video_tensor(stage_path(job.dir, last.index, last.name, ".safetensors"))
        job.status = f"resumed after {last.name}"
    else:
        job.status = "rendered"


# ---------------------------------------------------------------------------------------------------
# Writing outputs
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Writer:
    specs: list[StageSpec]
    settings: RenderConfig
    header: dict[str, Any]
    stats: list[dict[str, Any]] = field(default_factory=list)

    def stage_done(self, job: PromptJob, p: int, video: Tensor, seconds: float, batch: int) -> None:
        spec = self.specs[p]
        meta = {
            "fingerprint": job.fingerprints[p],
            "settings": job.settings[p],
            "seconds": seconds / batch,
            "batch_seconds": seconds,
            "batch_size": batch,
        }
        save_video_tensor(stage_path(job.dir, spec.index, spec.name, ".safetensors"), video, meta)
        self.stats[p]["prompts"] += 1
        self.stats[p]["seconds"] += seconds / batch
        if p < len(self.specs) - 1 and self.settings.save_intermediate:
            write_media(video_frames(video), stage_path(job.dir, spec.index, spec.name, ""), spec.stage.fps)
        if p == len(self.specs) - 1:
            self.finalize(job)

    def finalize(self, job: PromptJob) -> None:
        """Write the final media, the missing intermediates, the contact sheet, then the sidecar."""
        rows, labels, records = [], [], []
        if job.input is not None:
            rows.append(video_frames(job.input))
            labels.append("input")
        last = len(self.specs) - 1
        for p, spec in enumerate(self.specs):
            path = stage_path(job.dir, spec.index, spec.name, ".safetensors")
            meta = read_video_metadata(path) or {}
            frames = video_frames(load_video_tensor(path))
            rows.append(frames)
            labels.append(spec.name)
            base = stage_path(job.dir, spec.index, spec.name, "")
            media = base.with_name(base.name + (".mp4" if spec.stage.fps > 0 else ".png"))
            if p < last and self.settings.save_intermediate and not media.is_file():
                write_media(frames, base, spec.stage.fps)
            records.append(
                {
                    **spec.record(),
                    "file": str(path.relative_to(job.dir)),
                    "seconds": meta.get("seconds"),
                    "batch_seconds": meta.get("batch_seconds"),
                    "batch_size": meta.get("batch_size"),
                }
            )
        final_fps = self.specs[last].stage.fps
        output = write_media(rows[-1], job.dir / ("video" if final_fps > 0 else "image"), final_fps)
        sheet = None
        if self.settings.contact_sheet:
            contact_sheet(rows, job.dir / "sheet.png", labels=labels)
            sheet = "sheet.png"
        sidecar = {
            "prompt": job.prompt,
            "index": job.index,
            "seed": self.settings.seed,
            "precision": self.settings.precision,
            **self.header,
            "output": output.name,
            "sheet": sheet,
            "stages": records,
            "settings": job.settings,
            "fingerprint": job.fingerprints[-1],
        }
        write_json(job.dir / SIDECAR, sidecar)


@dataclass
class RenderSummary:
    """What a render or upscale did."""

    out_dir: Path
    prompts: list[dict[str, Any]]
    """Per prompt: index, prompt, dir, status."""
    stages: list[dict[str, Any]]
    """Per stage run: name, prompts sampled in this run, seconds (batch time shared by its prompts)."""
    seconds: float

    def table(self) -> str:
        """A plain-text table of the prompts and the stages, for the end of the job."""
        lines = [f"{'prompt':<7} {'status':<24} dir"]
        lines += [f"{p['index']:<7} {p['status']:<24} {p['dir']}" for p in self.prompts]
        lines.append("")
        lines.append(f"{'stage':<16} {'prompts':>7} {'seconds':>9}")
        lines += [f"{s['name']:<16} {s['prompts']:>7} {s['seconds']:>9.2f}" for s in self.stages]
        lines.append(f"total {self.seconds:.1f} s; outputs under {self.out_dir}")
        return "\n".join(lines)


def _run(
    jobs: list[PromptJob],
    specs: list[StageSpec],
    settings: RenderConfig,
    header: dict[str, Any],
    executor: ExecutorFactory | None,
    progress: bool,
) -> RenderSummary:
    """Finish resumed-complete jobs, schedule the rest, write `render.json`, return the summary."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    out = Path(settings.out_dir)
    writer = _Writer(specs, settings, header, [{"name": s.name, "prompts": 0, "seconds": 0.0} for s in specs])
    active = [j for j in jobs if not j.status.startswith("skipped")]
    for job in active:
        if job.next == len(specs):  # every stage file exists, the sidecar does not
            writer.finalize(job)
    pending = [j for j in active if j.next < len(specs)]
    if pending:
        bars = [
            tqdm(
                total=len(active),
                initial=sum(j.next > p for j in active),
                desc=spec.name,
                unit="prompt",
                position=p,
                disable=not progress,
            )
            for p, spec in enumerate(specs)
        ]

        def done(job: PromptJob, p: int, video: Tensor, seconds: float, batch: int) -> None:
            writer.stage_done(job, p, video, seconds, batch)
            bars[p].update(1)

        runner = (executor or local_stage_executor())(specs)
        try:
            schedule(pending, len(specs), runner, settings.batch_size, done)
        finally:
            runner.close()
            for bar in bars:
                bar.close()
    summary = RenderSummary(
        out_dir=out,
        prompts=[{"index": j.index, "prompt": j.prompt, "dir": j.dir.name, "status": j.status} for j in jobs],
        stages=writer.stats,
        seconds=time.perf_counter() - start,
    )
    write_json(
        out / SUMMARY,
        {
            **header,
            "seed": settings.seed,
            "batch_size": settings.batch_size,
            "precision": settings.precision,
            "prompts": summary.prompts,
            "stages": summary.stages,
            "seconds": summary.seconds,
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
        return _run(jobs, specs, settings, header, executor, progress)


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
    job = PromptJob(0, prompt, job_dir, stage_settings, prints, input=video, video=video)
    header = {
        "cascade": {"name": cascade.name, "file": cascade_file},
        "input": {"path": str(input_path), "from_stage": from_stage, "digest": digest},
    }
    with folder_lock(out, "upscale"):  # before reading what an earlier upscale left
        _resume(job, specs)
        return _run([job], specs, settings, header, executor, progress)
