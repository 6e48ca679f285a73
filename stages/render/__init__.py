"""Offline rendering through an Imagen Video–style cascade (base → TSR → SSR → …): `render(cascade,
prompts, settings)` samples every prompt through every stage, `upscale(...)` takes a user's clip through
the super-resolution stages, `plan_cascade` prices a cascade without loading weights.

    job       the entry points, fingerprints and resume, replicas, progress, the summary and failures
    schedule  fixed batches through the stages on replica pools, pipelined; executors
              (`pipeline.ray_render` runs on Ray)
    worker    one stage replica at work: reads its inputs, samples, writes every output itself
    stage     one cascade stage: its checkpoint checked, its runner
    output    the files of a render         plan      what a cascade costs, replica splits
    prompts   the prompts
"""

from stages.render.job import FAILURES, RenderSummary, render, upscale
from stages.render.output import SIDECAR, load_video_tensor, read_json, video_frames
from stages.render.plan import format_cascade_plan, format_replica_plan, plan_cascade, plan_replicas
from stages.render.prompts import Prompt, read_prompts_file
from stages.render.schedule import ExecutorFactory, ReplicaLost, StageExecutor, local_stage_executor
from stages.render.stage import StageItem, StageRunner, StageSpec
from stages.render.worker import PromptJob, RenderContext, StageRecord, StageWorker

__all__ = [
    "FAILURES",
    "SIDECAR",
    "ExecutorFactory",
    "Prompt",
    "PromptJob",
    "RenderContext",
    "RenderSummary",
    "ReplicaLost",
    "StageExecutor",
    "StageItem",
    "StageRecord",
    "StageRunner",
    "StageSpec",
    "StageWorker",
    "format_cascade_plan",
    "format_replica_plan",
    "load_video_tensor",
    "local_stage_executor",
    "plan_cascade",
    "plan_replicas",
    "read_json",
    "read_prompts_file",
    "render",
    "upscale",
    "video_frames",
]
