"""Training: one worker function, `train(cfg)`, that every launcher runs in each process (torchrun, the
DeepSpeed launcher, SLURM, Ray Train via `pipeline.ray_train`): a diffusion transformer under DeepSpeed
with an EMA, committed checkpoints with exact resume, metrics and previews.

    loop         the step loop                     trainer      the module DeepSpeed wraps, the EMA
    batches      batches at the training geometry  checkpoint   DeepSpeed state and per-rank state
    elastic      resuming at another world size    universal    DeepSpeed's converter, loading safely
    sync         what the loop reads from the device, and when
    metrics      progress bar, metrics.jsonl, TensorBoard
    parallelize  activation checkpointing, compile, the DeepSpeed config
    ops          DeepSpeed's compiled ops: none built on CPU, a bounded wait on build locks
    distributed  joining and leaving the launcher's process group
    previews     samples from the EMA weights      plan         what a run will do per step
"""

from stages.train.distributed import init_distributed, leave_distributed
from stages.train.loop import NonFiniteError, TrainResult, train
from stages.train.metrics import METRICS_FILE, TENSORBOARD_DIR, TrainMetrics
from stages.train.plan import format_training_plan, training_plan

__all__ = [
    "METRICS_FILE",
    "TENSORBOARD_DIR",
    "NonFiniteError",
    "TrainMetrics",
    "TrainResult",
    "format_training_plan",
    "init_distributed",
    "leave_distributed",
    "train",
    "training_plan",
]
