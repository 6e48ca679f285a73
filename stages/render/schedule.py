"""The render scheduler: prompt jobs move through the cascade's stages, pipelined.

Every stage has a queue of prompts waiting for it; an idle stage takes up to `render.batch_size` of
them as one batch, so different prompts occupy different stages at once. Stages run behind a
`StageExecutor`: `LocalExecutor` runs them in this process (tests, `--local`), `pipeline.ray_render`
runs one Ray actor per stage and overlaps them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from stages.render.stage import StageItem, StageRunner, StageSpec, timed_run


@dataclass
class PromptJob:
    """One prompt's way through the stages."""

    index: int
    prompt: str
    dir: Path
    settings: list[dict[str, Any]]
    """Per stage: what its output depends on (hashed into its fingerprint)."""
    fingerprints: list[str]
    input: Tensor | None = None
    """Upscale: the prepared input video (C, T, H, W)."""
    next: int = 0
    """Position (in the stages being run) of the next stage to run; len(stages) = all done."""
    video: Tensor | None = None
    """The latest stage output (the next stage's input)."""
    status: str = ""


class StageExecutor(Protocol):
    """Runs stage batches somewhere; at most one batch per stage is in flight at a time."""

    def prepare(self, stages: list[int]) -> None:
        """Get the stage positions that will run ready (e.g. start their actors, so weights load in
        parallel rather than when each stage's first batch arrives)."""

    def submit(self, stage: int, batch: list[StageItem]) -> None:
        """Start `batch` on stage position `stage` (may return before it finishes)."""

    def next_result(self) -> tuple[int, list[Tensor], float]:
        """Wait for a submitted batch to finish: (stage position, outputs in batch order, seconds)."""

    def close(self) -> None:
        """Release the stages (models, actors)."""


ExecutorFactory = Callable[[list[StageSpec]], StageExecutor]
"""Builds an executor for the stages being run (`specs[p]` is stage position p)."""


class LocalExecutor:
    """Runs batches in this process, deepest stage first (so prompts finish as early as possible).

    A stage's runner (`runner_factory(spec)`, default `StageRunner`) is built on its first batch, so a
    resumed render never loads stages it does not need; once loaded it stays in memory until `close`, so
    a render holds every stage it has reached.
    """

    def __init__(
        self, specs: list[StageSpec], runner_factory: Callable[[StageSpec], Any] = StageRunner
    ) -> None:
        self.specs = specs
        self.factory = runner_factory
        self.runners: dict[int, Any] = {}
        self.pending: dict[int, list[StageItem]] = {}

    def prepare(self, stages: list[int]) -> None:
        """Nothing: a local stage loads on its first batch."""

    def submit(self, stage: int, batch: list[StageItem]) -> None:
        self.pending[stage] = batch

    def next_result(self) -> tuple[int, list[Tensor], float]:
        stage = max(self.pending)
        batch = self.pending.pop(stage)
        if stage not in self.runners:
            self.runners[stage] = self.factory(self.specs[stage])
        outputs, seconds = timed_run(self.runners[stage], batch)
        return stage, outputs, seconds

    def close(self) -> None:
        self.runners.clear()


def local_stage_executor(runner_factory: Callable[[StageSpec], Any] = StageRunner) -> ExecutorFactory:
    """An `ExecutorFactory` for `LocalExecutor` with the given runner factory."""
    return lambda specs: LocalExecutor(specs, runner_factory)


StageDone = Callable[[PromptJob, int, Tensor, float, int], None]
"""Called as (job, stage position, output, batch seconds, batch size) when a stage finishes a prompt."""


def schedule(
    jobs: list[PromptJob], stages: int, executor: StageExecutor, batch_size: int, done: StageDone
) -> None:
    """Move every job from `job.next` through the last stage.

    Each stage has a queue; whenever a stage is idle it takes up to `batch_size` waiting jobs as one
    batch. Finished outputs go to `done`, then to the next stage's queue.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    queues: list[deque[PromptJob]] = [deque() for _ in range(stages)]
    for job in jobs:
        if job.next < stages:
            queues[job.next].append(job)
    needed = [job.next for job in jobs if job.next < stages]
    if needed:
        executor.prepare(list(range(min(needed), stages)))
    in_flight: dict[int, list[PromptJob]] = {}
    while True:
        for p in reversed(range(stages)):
            if p not in in_flight and queues[p]:
                batch = [queues[p].popleft() for _ in range(min(batch_size, len(queues[p])))]
                in_flight[p] = batch
                executor.submit(p, [StageItem(j.index, j.prompt, j.video) for j in batch])
        if not in_flight:
            return
        p, outputs, seconds = executor.next_result()
        batch = in_flight.pop(p)
        if len(outputs) != len(batch):
            raise RuntimeError(f"stage {p} returned {len(outputs)} videos for a batch of {len(batch)}")
        for job, video in zip(batch, outputs):
            job.video, job.next = video, p + 1
            done(job, p, video, seconds, len(batch))
            if job.next < stages:
                queues[job.next].append(job)
