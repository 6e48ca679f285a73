"""Ray adapter for rendering: one actor per cascade stage, batches submitted asynchronously.

Each actor holds one `stages.render.StageRunner` (the same class `--local` runs in-process), built
from its `StageSpec` argument, so the weights load once per stage and stay on the actor's device. The
driver's scheduler (`stages.render.schedule`) keeps at most one batch in flight per stage and collects
whichever finishes first with `ray.wait`, so while the SSR actor works on prompt 0 the TSR actor can
work on prompt 1 and the base on prompt 2. Outputs come back to the driver, which writes every file.

Devices: with GPUs in the cluster each actor asks for one (`num_gpus=1`); with fewer GPUs than stages
they share them (`num_gpus = GPUs / stages`), so a one-GPU machine still runs the whole cascade; on a
CPU-only cluster actors take no GPU and use Ray's default actor CPU accounting.

Nodes: the actors spread over the cluster's nodes, and an actor lost with its node restarts on another
(up to `RESTARTS` times) where its pending batch runs again; the driver still writes each output
once, so a render survives a lost node with every prompt rendered exactly once.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from pipeline.ray_cluster import ensure_ray
from stages.render import ExecutorFactory, StageItem, StageRunner, StageSpec, timed_run

RESTARTS = 3
"""How often a stage actor is restarted (and its batch retried) after dying, e.g. with its node."""


class _StageActor:
    """Ray actor body: a `StageRunner` and a timed `run`."""

    def __init__(self, spec: StageSpec) -> None:
        self.runner = StageRunner(spec)

    def run(self, batch: list[StageItem]) -> tuple[list[Tensor], float]:
        return timed_run(self.runner, batch)


def gpus_per_stage(cluster_gpus: float, stages: int) -> float:
    """1 GPU per stage actor when the cluster has enough, else an equal share; 0 without GPUs."""
    if cluster_gpus <= 0 or stages <= 0:
        return 0.0
    return 1.0 if cluster_gpus >= stages else cluster_gpus / stages


class RayExecutor:
    """A `StageExecutor` with one Ray actor per stage: `prepare` starts the actors of every stage the
    render needs up front, so their weights load in parallel (a stage that is submitted to before being
    prepared gets its actor then)."""

    def __init__(self, specs: list[StageSpec], num_gpus: float | None = None) -> None:
        import ray

        self.ray = ray
        self.specs = specs
        if num_gpus is None:
            num_gpus = gpus_per_stage(float(ray.cluster_resources().get("GPU", 0.0)), len(specs))
        self.num_gpus = num_gpus
        self.actors: dict[int, Any] = {}
        self.pending: dict[Any, int] = {}

    def _actor(self, stage: int) -> Any:
        if stage not in self.actors:
            options: dict[str, Any] = {
                "max_restarts": RESTARTS,
                "max_task_retries": RESTARTS,
                "scheduling_strategy": "SPREAD",
            }
            if self.num_gpus > 0:
                options["num_gpus"] = self.num_gpus
            remote = self.ray.remote(_StageActor).options(**options)
            self.actors[stage] = remote.remote(self.specs[stage])
        return self.actors[stage]

    def prepare(self, stages: list[int]) -> None:
        """Start the actors of these stages now, so their weights load in parallel."""
        for stage in stages:
            self._actor(stage)

    def submit(self, stage: int, batch: list[StageItem]) -> None:
        ref = self._actor(stage).run.remote(batch)
        self.pending[ref] = stage

    def next_result(self) -> tuple[int, list[Tensor], float]:
        ready, _ = self.ray.wait(list(self.pending), num_returns=1)
        ref = ready[0]
        stage = self.pending.pop(ref)
        outputs, seconds = self.ray.get(ref)
        return stage, outputs, seconds

    def close(self) -> None:
        for actor in self.actors.values():
            self.ray.kill(actor)
        self.actors.clear()
        self.pending.clear()


def ray_executor(
    address: str | None = None, num_gpus: float | None = None, num_cpus: int | None = None
) -> ExecutorFactory:
    """An `ExecutorFactory` for `stages.render.render` / `upscale` running on Ray: in-process (dashboard
    off) unless `address` or $RAY_ADDRESS names a cluster. `num_gpus` per actor overrides the default
    (see the module docstring)."""

    def build(specs: list[StageSpec]) -> RayExecutor:
        ensure_ray(address, num_cpus=num_cpus)
        return RayExecutor(specs, num_gpus)

    return build
