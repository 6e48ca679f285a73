"""Offline rendering through an Imagen Video–style cascade (base → TSR → SSR → …): `render(cascade,
prompts, settings)` samples every prompt through every stage, `upscale(...)` takes a user's clip through
the super-resolution stages, `plan_cascade` prices a cascade without loading weights.

    job       the entry points, fingerprints and resume, writing each prompt's outputs
    schedule  prompt jobs through the stages, pipelined; executors (`pipeline.ray_render` runs on Ray)
    stage     one cascade stage: its checkpoint checked, its runner
    output    the files of a render         plan      what a cascade costs        prompts   the prompts
"""

from stages.render.job import RenderSummary, render, upscale
from stages.render.output import SIDECAR, load_video_tensor, read_json, video_frames
from stages.render.plan import format_cascade_plan, plan_cascade
from stages.render.prompts import Prompt, read_prompts_file
from stages.render.schedule import ExecutorFactory, StageExecutor, local_stage_executor
from stages.render.stage import StageItem, StageRunner, StageSpec, timed_run

__all__ = [
    "SIDECAR",
    "ExecutorFactory",
    "Prompt",
    "RenderSummary",
    "StageExecutor",
    "StageItem",
    "StageRunner",
    "StageSpec",
    "format_cascade_plan",
    "load_video_tensor",
    "local_stage_executor",
    "plan_cascade",
    "read_json",
    "read_prompts_file",
    "render",
    "timed_run",
    "upscale",
    "video_frames",
]
