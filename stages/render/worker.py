"""A cascade stage at work: `StageWorker.run(jobs)` reads each prompt's input from the file the previous
stage wrote, samples the batch, and writes every output where it runs (the output folder is shared
storage on a cluster); the last stage also writes the final media, the contact sheet and the sidecar.
Only small `StageRecord`s go back to the scheduler, never a video.

Failures stay with their prompt: when a batch raises, each of its prompts is sampled alone, and the
ones that still raise come back as `failed` records with the reason while their batch mates go on.
A retried batch (its replica died mid-batch) finds the stage files the dead attempt managed to write
and reports them `found` without sampling them again, so nothing is written twice.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from configs import RenderConfig
from stages.media import contact_sheet
from stages.render.output import (
    SIDECAR,
    load_video_tensor,
    read_video_metadata,
    save_video_tensor,
    stage_path,
    video_frames,
    write_json,
    write_media,
)
from stages.render.stage import StageItem, StageRunner, StageSpec

INPUT_FILE = "input.safetensors"
"""An upscale's prepared input clip, beside the stage files (the first stage's input)."""


@dataclass
class PromptJob:
    """One prompt's way through the stages: what a stage needs to find, name and fingerprint its files."""

    index: int
    prompt: str
    dir: Path
    settings: list[dict[str, Any]]
    """Per stage: what its output depends on (hashed into its fingerprint)."""
    fingerprints: list[str]
    next: int = 0
    """Position (in the stages being run) of the next stage to run; len(stages) = all done."""
    status: str = ""


@dataclass(frozen=True)
class RenderContext:
    """What every stage worker of one render shares (picklable for Ray)."""

    specs: list[StageSpec]
    """The stages being run, in order (position p runs `specs[p]`)."""
    settings: RenderConfig
    header: dict[str, Any]
    """Sidecar fields common to every prompt (the cascade, an upscale's input)."""


@dataclass(frozen=True)
class StageRecord:
    """What a stage did with one prompt of a batch."""

    index: int
    status: Literal["done", "found", "failed"]
    """done: sampled and written now; found: its file was already written (a retried batch); failed."""
    seconds: float = 0.0
    """This prompt's share of its batch's sampling time."""
    batch_size: int = 0
    reason: str = ""
    """Why it failed."""


def input_path(job: PromptJob, specs: list[StageSpec], p: int) -> Path | None:
    """The file stage position `p` reads for `job`: the previous stage's output, an upscale's prepared
    input for a first super-resolution stage, nothing for the base."""
    if p > 0:
        prev = specs[p - 1]
        return stage_path(job.dir, prev.index, prev.name, ".safetensors")
    return None if specs[0].stage.kind == "base" else job.dir / "stages" / INPUT_FILE


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"


class StageWorker:
    """One replica of stage position `position`: a loaded runner (`runner_factory(spec, device)`,
    default `StageRunner`) and the writing of its outputs. Runs in-process (`--local`) and as a Ray
    actor's body."""

    def __init__(
        self,
        context: RenderContext,
        position: int,
        device: str | None = None,
        runner_factory: Callable[..., StageRunner] | None = None,
    ) -> None:
        self.context, self.position = context, position
        self.spec = context.specs[position]
        self.runner = (runner_factory or StageRunner)(self.spec, device)
        self.where = f"{socket.gethostname()}:{os.getpid()}"
        """Host and process, recorded in every file this replica writes."""

    def ready(self) -> bool:
        """True once the weights are loaded (a Ray caller waits on it to start every replica at once)."""
        return True

    def _output(self, job: PromptJob) -> Path:
        return stage_path(job.dir, self.spec.index, self.spec.name, ".safetensors")

    def _written(self, job: PromptJob) -> bool:
        meta = read_video_metadata(self._output(job))
        return meta is not None and meta.get("fingerprint") == job.fingerprints[self.position]

    def run(self, jobs: list[PromptJob]) -> list[StageRecord]:
        """Sample and write the jobs' outputs at this stage; one record per job, in order."""
        records: dict[int, StageRecord] = {
            j.index: StageRecord(j.index, "found") for j in jobs if self._written(j)
        }
        todo = [j for j in jobs if j.index not in records]
        try:
            records |= self._sample(todo)
        except Exception:  # isolate: each prompt alone, so one bad prompt fails alone
            traceback.print_exc()
            for job in todo:
                if self._written(job):  # written before the batch failed: kept, not sampled again
                    records[job.index] = StageRecord(job.index, "found")
                    continue
                try:
                    records |= self._sample([job])
                except Exception as err:
                    traceback.print_exc()
                    records[job.index] = StageRecord(job.index, "failed", reason=_reason(err))
        if self.position == len(self.context.specs) - 1:
            for job in jobs:
                if records[job.index].status != "failed":
                    try:
                        finalize(job, self.context)
                    except Exception as err:
                        traceback.print_exc()
                        records[job.index] = StageRecord(job.index, "failed", reason=_reason(err))
        return [records[j.index] for j in jobs]

    def _sample(self, jobs: list[PromptJob]) -> dict[int, StageRecord]:
        if not jobs:
            return {}
        specs, p = self.context.specs, self.position
        items = []
        for job in jobs:
            source = input_path(job, specs, p)
            items.append(
                StageItem(job.index, job.prompt, None if source is None else load_video_tensor(source))
            )
        start = time.perf_counter()
        videos = self.runner.run(items)
        seconds = time.perf_counter() - start
        for job, video in zip(jobs, videos, strict=True):
            self._write(job, video, seconds, len(jobs))
        share = seconds / len(jobs)
        return {j.index: StageRecord(j.index, "done", share, len(jobs)) for j in jobs}

    def _write(self, job: PromptJob, video: Tensor, seconds: float, batch: int) -> None:
        spec, settings = self.spec, self.context.settings
        meta = {
            "fingerprint": job.fingerprints[self.position],
            "settings": job.settings[self.position],
            "seconds": seconds / batch,
            "batch_seconds": seconds,
            "batch_size": batch,
            "worker": self.where,
        }
        save_video_tensor(self._output(job), video, meta)
        if self.position < len(self.context.specs) - 1 and settings.save_intermediate:
            write_media(video_frames(video), stage_path(job.dir, spec.index, spec.name, ""), spec.stage.fps)


def finalize(job: PromptJob, context: RenderContext) -> None:
    """Write a prompt's final media, any missing intermediates and the contact sheet, then the sidecar
    (its done marker), from the stage files; nothing when the sidecar is already there."""
    if (job.dir / SIDECAR).is_file():
        return
    specs, settings = context.specs, context.settings
    rows, labels, records = [], [], []
    source = input_path(job, specs, 0)
    if source is not None:
        rows.append(video_frames(load_video_tensor(source)))
        labels.append("input")
    last = len(specs) - 1
    for p, spec in enumerate(specs):
        path = stage_path(job.dir, spec.index, spec.name, ".safetensors")
        meta = read_video_metadata(path) or {}
        frames = video_frames(load_video_tensor(path))
        rows.append(frames)
        labels.append(spec.name)
        base = stage_path(job.dir, spec.index, spec.name, "")
        media = base.with_name(base.name + (".mp4" if spec.stage.fps > 0 else ".png"))
        if p < last and settings.save_intermediate and not media.is_file():
            write_media(frames, base, spec.stage.fps)
        records.append(
            {
                **spec.record(),
                "file": str(path.relative_to(job.dir)),
                "seconds": meta.get("seconds"),
                "batch_seconds": meta.get("batch_seconds"),
                "batch_size": meta.get("batch_size"),
                "worker": meta.get("worker"),
            }
        )
    final_fps = specs[last].stage.fps
    output = write_media(rows[-1], job.dir / ("video" if final_fps > 0 else "image"), final_fps)
    sheet = None
    if settings.contact_sheet:
        contact_sheet(rows, job.dir / "sheet.png", labels=labels)
        sheet = "sheet.png"
    sidecar = {
        "prompt": job.prompt,
        "index": job.index,
        "seed": settings.seed,
        "precision": settings.precision,
        **context.header,
        "output": output.name,
        "sheet": sheet,
        "stages": records,
        "settings": job.settings,
        "fingerprint": job.fingerprints[-1],
    }
    write_json(job.dir / SIDECAR, sidecar)
