"""Ray Train adapter for the training stage: `stages.train.train` in every worker of a `TorchTrainer`.

Ray Train (the V2 API, Ray's default) starts one worker actor per rank, sets RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT, initialises the torch process group (gloo on CPU, nccl on GPU)
and calls our worker function in a thread of each actor; `stages.train.init_distributed()` then
reuses that group.

Failures: when a worker dies or raises (its node lost included), Ray Train tears the whole group down
and starts a new one (up to `max_failures` times). Every restarted worker calls `train(resume="auto")`,
which continues from the newest committed checkpoint in `train.out_dir` with exact resume, so a
restart loses at most `train.checkpoint_every` steps. Ray learns that an attempt has begun from a
marker checkpoint that rank 0 reports before training (`ray.train.get_checkpoint()` is then set in
every later attempt); the model's own checkpoints never go through Ray. A new group waits at most
`wait_for_workers_s` for its workers' resources (e.g. for a lost node to come back, or behind another
training), and is tried `1 + max_failures` times; then the run fails with WorkersUnavailable, which
names what it waited for, instead of waiting on.

Placement: each rank prints one line, `[ray_train] rank R of W on node NODE_ID`, which reaches the
driver's output (Ray folds such lines of several workers into one unless RAY_DEDUP_LOGS=0).

Storage: `train.out_dir` holds the checkpoints and Ray Train's run folder (`out_dir/ray/<run name>`).
On a multi-node cluster it must be shared storage (NFS, Lustre, a mounted bucket) that every node sees
at the same path; relative paths in the config are made absolute on the driver.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configs import PipelineTrainingConfig, RunConfig
from pipeline.ray_cluster import ensure_ray
from stages.train import NonFiniteError, TrainResult, train

RAY_TRAIN_V2 = "RAY_TRAIN_V2_ENABLED"
"""Ray's switch between the Train V1 and V2 APIs: V2 unless it is set to anything but 1 or true."""
WORKER_GROUP_START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Seconds Ray Train V2 waits for a worker group's resources, read from the driver's environment when a
run starts (`ray_train` sets it from `wait_for_workers_s`). Ray reads this variable but exports no
name for it; tests/unit/pipeline/test_ray_pins.py checks it against Ray's own constant."""


class WorkersUnavailable(RuntimeError):
    """A training's worker group could not get its resources within `wait_for_workers_s`."""


WorkerFn = Callable[..., TrainResult]
"""`train`'s signature: `(cfg, *, resume, progress) -> TrainResult`."""


@dataclass(frozen=True)
class RayTrainResult:
    step: int
    """Optimizer steps done."""
    checkpoint: Path | None
    """The newest committed checkpoint."""
    ray_dir: Path
    """Ray Train's folder for this run (its state and the attempt marker)."""


URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
"""A shard source that is a URL (`http://…`, `pipe:…`), not a path."""


def _absolute(cfg: RunConfig) -> RunConfig:
    """`cfg` with its input/output paths absolute, as workers do not share the driver's directory."""

    def resolve(path: str) -> str:
        if not path or URL_SCHEME.match(path):  # http://, pipe:, gs://…: the same on every node
            return path
        return str(Path(path).expanduser().resolve())

    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, out_dir=resolve(cfg.train.out_dir)),
        data=dataclasses.replace(cfg.data, shards=resolve(cfg.data.shards)),
        text=dataclasses.replace(cfg.text, t5_path=resolve(cfg.text.t5_path)),
        distill=dataclasses.replace(cfg.distill, teacher=resolve(cfg.distill.teacher)),
    )


def v2_enabled() -> bool:
    """Whether Ray Train runs its V2 API, read from the variable as Ray reads it."""
    value = os.environ.get(RAY_TRAIN_V2)
    return value is None or value.lower() in ("1", "true")


def _mark_started() -> None:
    """Collective: report the marker checkpoint from rank 0 that makes later attempts resume."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        marker = None
        if ray.train.get_context().get_world_rank() == 0:
            Path(tmp, "started.json").write_text(json.dumps({"resume_on_retry": "auto"}))
            marker = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({}, checkpoint=marker)


def _train_worker(config: dict[str, Any]) -> TrainResult | NonFiniteError:
    """One Ray Train worker: pick `resume` for this attempt, align the CUDA device, run the stage."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    context = ray.train.get_context()
    node = ray.get_runtime_context().get_node_id()
    rank, world = context.get_world_rank(), context.get_world_size()
    print(f"[ray_train] rank {rank} of {world} on node {node}", flush=True)
    torch.set_num_threads(config["threads"])  # the CPUs Ray reserved for this worker, not the whole node
    resume = config["resume"]
    if ray.train.get_checkpoint() is not None:
        resume = "auto"  # a restarted attempt continues from the newest committed checkpoint
    else:
        _mark_started()
    if torch.cuda.is_available():
        # train() and DeepSpeed pick the device by LOCAL_RANK; Ray shares CUDA_VISIBLE_DEVICES among a
        # node's workers, where this worker's GPU need not have the index of its local rank.
        os.environ["LOCAL_RANK"] = str(ray.train.torch.get_device().index)
    try:
        return config["worker_fn"](config["cfg"], resume=resume, progress=False)
    except NonFiniteError as err:
        return err  # the same on every rank (the check is collective) and a retry would repeat it


def ray_train(
    cfg: RunConfig,
    *,
    resume: str = "auto",
    address: str | None = None,
    workers: int = PipelineTrainingConfig.workers,
    min_workers: int = PipelineTrainingConfig.min_workers,
    cpus_per_worker: int = PipelineTrainingConfig.cpus_per_worker,
    gpus_per_worker: float = PipelineTrainingConfig.gpus_per_worker,
    wait_for_workers_s: float = PipelineTrainingConfig.wait_for_workers_s,
    max_failures: int = 3,
    worker_fn: WorkerFn = train,
) -> RayTrainResult:
    """Train on Ray: `workers` ranks (`cpus_per_worker` CPUs, which Ray also makes each worker's thread
    count, and `gpus_per_worker` GPUs each; the defaults are a pipeline training's,
    `PipelineTrainingConfig`), restarted from the newest committed checkpoint up to `max_failures` times
    when a worker fails; each group waits at most `wait_for_workers_s` for its resources (and a group
    that cannot start is tried as often). With 0 < `min_workers` < `workers` the group is elastic: a
    restarted group takes the workers the cluster can place, at least `min_workers`, and every rank
    resumes the last checkpoint at that world size (`stages/train/elastic.py`); Ray grows the group
    again, from the last checkpoint, when resources return.

    resume: as for `train`, for the first attempt; restarts always use "auto". address: a Ray cluster
    (else $RAY_ADDRESS, else an in-process Ray). worker_fn: the function each worker runs, `train`
    unless a test wraps it (it must be importable by name in the workers). Workers show no progress
    bars; follow `out_dir/metrics.jsonl` or TensorBoard. Raises NonFiniteError without retrying when
    training stops on non-finite losses, WorkersUnavailable when a group's resources are not there within
    `wait_for_workers_s`, and ray.train.TrainingFailedError when failures outlast `max_failures`.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    if not v2_enabled():
        raise RuntimeError(f"ray_train needs the Ray Train V2 API: unset {RAY_TRAIN_V2}=0")
    if workers < 1 or cpus_per_worker < 1:
        raise ValueError(f"workers={workers}, cpus_per_worker={cpus_per_worker}: need at least 1 of each")
    if not 0 <= min_workers <= workers:
        raise ValueError(f"min_workers={min_workers}: expected 0 (fixed size) up to workers={workers}")
    if 0 < gpus_per_worker < 1 and workers > 1:
        raise ValueError(
            f"gpus_per_worker={gpus_per_worker}: nccl needs a whole GPU per rank (use 0 for CPU, or >= 1)"
        )
    if wait_for_workers_s <= 0:
        raise ValueError(f"wait_for_workers_s={wait_for_workers_s}: need a positive number of seconds")
    # read by the trainer when the run starts, and passed on to its controller
    os.environ[WORKER_GROUP_START_TIMEOUT] = str(wait_for_workers_s)
    ensure_ray(address)
    cfg = _absolute(cfg)
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, "GPU": gpus_per_worker} if use_gpu else {"CPU": cpus_per_worker}
    # a fresh name per call: Ray Train restores a run folder it finds, which would make a new run's
    # first attempt look like a restart
    name = f"train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    storage = Path(cfg.train.out_dir) / "ray"
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "cfg": cfg,
            "resume": resume,
            "worker_fn": worker_fn,
            "threads": cpus_per_worker,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=(min_workers, workers) if 0 < min_workers < workers else workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            # a group that cannot start (in time) is retried as often as a failed one, not forever, as
            # Ray would: a restart right after a node loss may still be placed on the lost node
            failure_config=ray.train.FailureConfig(
                max_failures=max_failures, controller_failure_limit=max_failures
            ),
        ),
    )
    try:
        outcome = trainer.fit().return_value
    except ray.train.ControllerError as err:
        if not isinstance(err.controller_failure, WorkerGroupStartupTimeoutError):
            raise
        each = ", ".join(f"{v:g} {k}" for k, v in resources.items())
        needed = min_workers if 0 < min_workers < workers else workers
        raise WorkersUnavailable(
            f"Ray could not place {needed} training workers ({each} each) within {wait_for_workers_s:g} s, "
            f"{max_failures + 1} times (the cluster has {_alive_resources()} on its alive nodes): add or "
            "free resources, or wait longer with --wait-for-workers-s / trainings.NAME.wait_for_workers_s"
        ) from None
    if isinstance(outcome, NonFiniteError):
        raise outcome
    return RayTrainResult(step=outcome.step, checkpoint=outcome.checkpoint, ray_dir=storage / name)


def _alive_resources() -> str:
    """The CPUs and GPUs of the cluster's alive nodes, for a message."""
    import ray

    total: dict[str, float] = {}
    for node in ray.nodes():
        if node["Alive"]:
            for key in ("CPU", "GPU"):
                total[key] = total.get(key, 0.0) + node["Resources"].get(key, 0.0)
    return ", ".join(f"{v:g} {k}" for k, v in total.items() if v) or "no CPUs"
