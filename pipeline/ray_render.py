"""Ray adapter for rendering: a pool of actors per cascade stage, batches submitted asynchronously.

Each actor holds one `stages.render.StageWorker` (the same class `--local` runs in-process): a stage's
weights load once per replica and stay on its device, and the replica writes its outputs itself, so
only jobs and small records cross the driver. The driver's scheduler (`stages.render.schedule`) gives
each stage's batches to whichever of its replicas is free and collects whichever finishes first with
`ray.wait`, so every stage works on other prompts at once.

Devices (`render.devices`, `render.device`): on `cuda` every replica asks Ray for one GPU (a share
when there are fewer devices than stages, so a one-GPU machine still runs the whole cascade); on
`cpu` a replica reserves nothing (Ray's actor default), so a lost node's replicas always find room on
the nodes left, and samples on one thread (Ray sets OMP_NUM_THREADS=1 for such actors). `auto` is
cuda when the cluster has GPUs.

Failures: a replica whose process or node dies is restarted by Ray (on another node if need be) and
its batch runs again there (`RESTARTS`); past that the scheduler replaces the replica and resubmits
(`stages.render.schedule.RETRIES`). A retried batch skips the files its dead attempt wrote.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.ray_cluster import ensure_ray
from stages.render import ExecutorFactory, PromptJob, RenderContext, ReplicaLost, StageRecord, StageWorker

RESTARTS = 3
"""How often Ray restarts a stage actor (and retries its batch) after it died, e.g. with its node."""


class _StageActor:
    """Ray actor body: a `StageWorker`."""

    def __init__(self, context: RenderContext, position: int, device: str, runner_factory: Any) -> None:
        self.worker = StageWorker(context, position, device, runner_factory)

    def ready(self) -> bool:
        return self.worker.ready()

    def run(self, jobs: list[PromptJob]) -> list[StageRecord]:
        return self.worker.run(jobs)


def replica_resources(device: str, budget: float, replicas: int) -> dict[str, float]:
    """What Ray reserves per replica: on cuda one GPU when the budget covers every replica, else an
    equal share of it; on cpu nothing."""
    if device != "cuda":
        return {}
    return {"num_gpus": 1.0 if budget >= replicas else budget / replicas}


class RayExecutor:
    """A `StageExecutor` with pools of Ray actors (see the module docstring)."""

    def __init__(self, context: RenderContext, runner_factory: Callable[..., Any] | None = None) -> None:
        import ray

        self.ray, self.context, self.runner_factory = ray, context, runner_factory
        settings = context.settings
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0.0))
        self.device = settings.device if settings.device != "auto" else ("cuda" if gpus > 0 else "cpu")
        if self.device == "cuda" and gpus < max(1, settings.devices):
            raise ValueError(
                f"render.devices={settings.devices} on cuda (--gpus): the Ray cluster has {gpus:g} GPUs"
            )
        self.budget = float(settings.devices) or gpus
        self.options: dict[str, Any] = {}
        self.actors: dict[tuple[int, int], Any] = {}
        self.pending: dict[Any, tuple[int, int]] = {}

    def _new(self, stage: int) -> Any:
        remote = self.ray.remote(_StageActor).options(**self.options)
        return remote.remote(self.context, stage, self.device, self.runner_factory)

    def start(self, replicas: list[int]) -> None:
        self.options = {
            "max_restarts": RESTARTS,
            "max_task_retries": RESTARTS,
            "scheduling_strategy": "SPREAD",
            **replica_resources(self.device, self.budget, sum(replicas)),
        }
        for p, count in enumerate(replicas):
            for r in range(count):
                self.actors[(p, r)] = self._new(p)
        for (p, _), actor in self.actors.items():  # weights load on every replica at once
            try:
                self.ray.get(actor.ready.remote())
            except self.ray.exceptions.RayError as err:
                name = self.context.specs[p].name
                raise RuntimeError(f"stage '{name}': a replica could not load: {err}") from None

    def submit(self, stage: int, replica: int, jobs: list[PromptJob]) -> None:
        self.pending[self.actors[(stage, replica)].run.remote(jobs)] = (stage, replica)

    def next_result(self) -> tuple[int, int, list[StageRecord] | ReplicaLost]:
        ready, _ = self.ray.wait(list(self.pending), num_returns=1)
        stage, replica = self.pending.pop(ready[0])
        try:
            return stage, replica, self.ray.get(ready[0])
        except self.ray.exceptions.RayError as err:  # died past its restarts, or raised outside a prompt
            return stage, replica, ReplicaLost(f"{type(err).__name__}: {str(err)[:400]}")

    def replace(self, stage: int, replica: int) -> None:
        self.ray.kill(self.actors[(stage, replica)], no_restart=True)
        self.actors[(stage, replica)] = self._new(stage)

    def close(self) -> None:
        for actor in self.actors.values():
            self.ray.kill(actor, no_restart=True)
        self.actors.clear()
        self.pending.clear()


def ray_executor(
    address: str | None = None, num_cpus: int | None = None, runner_factory: Callable[..., Any] | None = None
) -> ExecutorFactory:
    """An `ExecutorFactory` for `stages.render.render` / `upscale` running on Ray: in-process (dashboard
    off) unless `address` or $RAY_ADDRESS names a cluster. `runner_factory(spec, device)` builds each
    replica's runner (default `StageRunner`; tests inject faults through it)."""

    def build(context: RenderContext) -> RayExecutor:
        ensure_ray(address, num_cpus=num_cpus)
        return RayExecutor(context, runner_factory)

    return build
