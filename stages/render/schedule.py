"""The render scheduler: fixed batches of prompts move through the cascade's stages, pipelined, each
stage served by a pool of replicas.

- Batches are formed once, before anything runs: the prompts waiting for the same stage, in index
  order, `render.batch_size` at a time. A batch keeps its prompts through every later stage (less the
  ones that fail), so a prompt's batch mates, and with them its video bit for bit, do not depend on
  the number of replicas or on which finished first.
- A stage's batches go to whichever of its replicas is free; the deepest stages are served first, so
  prompts finish as early as possible.
- Backpressure: at most `window` batches are in progress (started, not finished) at once; a new batch
  starts only when one finishes, so the work in flight, and the intermediate files waiting on disk, stay
  bounded however many prompts there are.
- A replica that dies (`ReplicaLost`: its process or node is gone, after Ray's own restarts) is
  replaced and its batch goes back to the front of the stage's queue, up to `retries` times per
  batch and stage; then its prompts fail with the reason.

Stages run behind a `StageExecutor`: `LocalExecutor` runs them in this process (tests, `--local`),
`pipeline.ray_render` runs them on pools of Ray actors. Workers write every output themselves
(`stages.render.worker`), so only jobs and small records pass through here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from stages.render.worker import PromptJob, RenderContext, StageRecord, StageWorker

RETRIES = 3
"""How often one batch is resubmitted at one stage after its replica died."""


@dataclass(frozen=True)
class ReplicaLost:
    """A replica died with a batch in flight (its process or its node is gone)."""

    reason: str


class StageExecutor(Protocol):
    """Runs batches on stage replicas somewhere; one batch at a time per replica."""

    def start(self, replicas: list[int]) -> None:
        """Start `replicas[p]` workers for stage position p (0: the stage is not needed) and wait until
        their weights are loaded (a stage that cannot load raises here, before any batch)."""

    def submit(self, stage: int, replica: int, jobs: list[PromptJob]) -> None:
        """Start `jobs` as one batch on replica `replica` of stage position `stage`."""

    def next_result(self) -> tuple[int, int, list[StageRecord] | ReplicaLost]:
        """Wait for a submitted batch: (stage, replica, one record per job in order, or ReplicaLost)."""

    def replace(self, stage: int, replica: int) -> None:
        """Start a new worker in place of a lost replica."""

    def close(self) -> None:
        """Release every replica."""


ExecutorFactory = Callable[[RenderContext], StageExecutor]
"""Builds an executor for one render's stages (`context.specs[p]` is stage position p)."""


class LocalExecutor:
    """Runs batches in this process, one replica per stage, deepest stage first. A stage's worker is
    built when `start` asks for it and stays in memory until `close`."""

    def __init__(self, context: RenderContext, runner_factory: Callable[..., Any] | None = None) -> None:
        self.context = context
        self.factory = runner_factory
        self.workers: dict[int, StageWorker] = {}
        self.pending: dict[int, list[PromptJob]] = {}

    def start(self, replicas: list[int]) -> None:
        for p, count in enumerate(replicas):
            if count:
                self.workers[p] = StageWorker(self.context, p, runner_factory=self.factory)

    def submit(self, stage: int, replica: int, jobs: list[PromptJob]) -> None:
        self.pending[stage] = jobs

    def next_result(self) -> tuple[int, int, list[StageRecord] | ReplicaLost]:
        stage = max(self.pending)
        return stage, 0, self.workers[stage].run(self.pending.pop(stage))

    def replace(self, stage: int, replica: int) -> None:
        raise AssertionError("a local replica is never lost")

    def close(self) -> None:
        self.workers.clear()


def local_stage_executor(runner_factory: Callable[..., Any] | None = None) -> ExecutorFactory:
    """An `ExecutorFactory` for `LocalExecutor` (`runner_factory(spec, device)` builds each stage's
    runner; default `StageRunner`)."""
    return lambda context: LocalExecutor(context, runner_factory)


StageDone = Callable[[PromptJob, int, StageRecord], None]
"""Called as (job, stage position, record) for every prompt a stage reports."""


@dataclass
class _Batch:
    jobs: list[PromptJob]
    started: bool = False
    attempts: int = 0


def form_batches(jobs: list[PromptJob], stages: int, batch_size: int) -> list[deque[_Batch]]:
    """Per stage position, the batches starting there: its waiting jobs in index order, chunked."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    queues: list[deque[_Batch]] = [deque() for _ in range(stages)]
    for p in range(stages):
        waiting = sorted((j for j in jobs if j.next == p), key=lambda j: j.index)
        queues[p].extend(_Batch(waiting[i : i + batch_size]) for i in range(0, len(waiting), batch_size))
    return queues


def schedule(
    jobs: list[PromptJob],
    replicas: list[int],
    executor: StageExecutor,
    batch_size: int,
    done: StageDone,
    window: int,
    retries: int = RETRIES,
) -> None:
    """Move every job from `job.next` through the last stage (see the module docstring); every
    record goes to `done` (a failed prompt stops there; a lost batch out of retries fails as
    `failed` records with the replica's reason)."""
    stages = len(replicas)
    queues = form_batches(jobs, stages, batch_size)
    free = [list(range(count)) for count in replicas]
    in_flight: dict[tuple[int, int], _Batch] = {}
    active = 0
    while True:
        for p in reversed(range(stages)):
            while free[p] and queues[p]:
                batch = queues[p][0]
                if not batch.started and active >= window:
                    break
                queues[p].popleft()
                if not batch.started:
                    batch.started, active = True, active + 1
                replica = free[p].pop(0)
                in_flight[(p, replica)] = batch
                executor.submit(p, replica, batch.jobs)
        if not in_flight:
            left = sum(len(q) for q in queues)
            if left:
                raise RuntimeError(f"{left} batches are waiting for stages without replicas ({replicas})")
            return
        p, replica, outcome = executor.next_result()
        batch = in_flight.pop((p, replica))
        if isinstance(outcome, ReplicaLost):
            executor.replace(p, replica)
            free[p].append(replica)
            batch.attempts += 1
            if batch.attempts <= retries:
                queues[p].appendleft(batch)
                continue
            reason = f"replica lost {batch.attempts} times: {outcome.reason}"
            outcome = [StageRecord(job.index, "failed", reason=reason) for job in batch.jobs]
        else:
            free[p].append(replica)
        if [r.index for r in outcome] != [j.index for j in batch.jobs]:
            raise RuntimeError(
                f"stage {p} reported prompts {[r.index for r in outcome]} for a batch of "
                f"{[j.index for j in batch.jobs]}"
            )
        survivors = []
        for job, record in zip(batch.jobs, outcome):
            if record.status != "failed":
                job.next = p + 1
                survivors.append(job)
            done(job, p, record)
        if survivors and p + 1 < stages:
            queues[p + 1].append(_Batch(survivors, started=True))
        else:
            active -= 1
