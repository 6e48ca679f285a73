"""One stage of a rendering cascade: its checkpoint checked and resolved (`prepare_stages`), prompt
lengths checked against its text encoder (`check_prompt_lengths`), and the runner that loads its
weights and samples a batch (`StageRunner`).

A stage is a model, a text encoder and a diffusion config, all read from a committed training
checkpoint (its `config.yaml` and the EMA weights exported beside it, `stages.artifacts`): safetensors
only, never a pickle. The cascade stage's sampler, steps and guidance override
the checkpoint's diffusion values. Everything here except `StageRunner` reads only small files, so a
bad cascade fails before any weights load.

Random streams: prompt i at stage k draws from `item_generator(seed, i, k)` alone (a super-resolution
stage first the augmentation noise of its conditioning, then its starting noise); a prompt's video
therefore never depends on its batch mates or on which stage ran when.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from configs import (
    CascadeConfig,
    CascadeStageConfig,
    ConfigError,
    DiffusionConfig,
    RunConfig,
    check_stage_model,
    load_config,
    stage_sampling,
)
from models.superres import upsample_video
from models.text import check_t5_dir
from stages.artifacts import exported_files, load_exported, resolve_committed
from stages.precision import torch_dtype
from stages.sampling import generate


@dataclass(frozen=True)
class StageItem:
    """One prompt entering a stage: its index (the random-stream key), text and input video."""

    index: int
    """Prompt index in the render (0-based)."""
    prompt: str
    """Prompt text ("" for an unprompted upscale)."""
    video: Tensor | None
    """The previous stage's output (C, T, H, W) float32 in [-1, 1]; None for the base stage."""


@dataclass(frozen=True)
class StageSpec:
    """Everything a stage runner needs, resolved and checked on the driver (picklable for Ray)."""

    index: int
    """Position in the cascade (0 = base)."""
    stage: CascadeStageConfig
    """The cascade's stage: name, kind, output shape, sampler settings."""
    checkpoint: str
    """The committed step directory the weights come from."""
    run: RunConfig
    """The checkpoint's own config (model, text encoder, diffusion as trained)."""
    diffusion: DiffusionConfig
    """The checkpoint's diffusion config with the stage's sampler, steps and guidance applied."""
    seed: int
    """Render seed."""
    precision: str = "fp32"
    """Dtype of the stage model while sampling (`render.precision`: fp32 or bf16)."""

    @property
    def name(self) -> str:
        return self.stage.name

    def record(self) -> dict:
        """The stage's entry in a video sidecar (settings, without timings)."""
        s, d = self.stage, self.diffusion
        return {
            "name": s.name,
            "kind": s.kind,
            "checkpoint": self.checkpoint,
            "shape": [self.run.model.in_channels, s.frames, s.height, s.width],
            "fps": s.fps,
            "sampler": d.sampler,
            "steps": d.steps,
            "guidance": {"scale": d.guidance_scale, "schedule": d.guidance_schedule, "low": d.guidance_low},
            "cond_aug_level": s.cond_aug_level if s.kind != "base" else None,
            # recorded only when not fp32: an fp32 stage's fingerprint does not depend on the field
            **({"precision": self.precision} if self.precision != "fp32" else {}),
            **({"distilled": self._distilled()} if self.run.distill.teacher else {}),
        }

    def _distilled(self) -> dict:
        """A distilled student's provenance: its teacher, the steps it learned, its guidance input."""
        d, m = self.run.distill, self.run.model
        return {"teacher": d.teacher, "steps": d.steps, "guidance_range": list(m.guidance_range)}


# ---------------------------------------------------------------------------------------------------
# Resolving and checking checkpoints (small files only)
# ---------------------------------------------------------------------------------------------------


def _read_checkpoint_config(step: Path, where: str) -> RunConfig:
    path = step / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: {path} is missing (not a training checkpoint?)")
    try:
        return load_config([path])
    except ConfigError as err:
        raise ValueError(f"{where}: {path} is not a valid run config: {err}") from None


def prepare_stage(
    cascade: CascadeConfig,
    index: int,
    seed: int,
    guidance_scale: float | None = None,
    precision: str = "fp32",
) -> StageSpec:
    """Resolve stage `index`'s checkpoint and check it fits the stage (kind, factor, patch, files).

    FileNotFoundError or ValueError naming the stage, the checkpoint and the mismatch. `guidance_scale`
    (e.g. 1 for an unprompted upscale) replaces the stage's guidance with a constant weight; `precision`
    (`render.precision`, checked by `configs.validate.validate_render`) is the dtype the stage's model
    will sample in.
    """
    stage = cascade.stages[index]
    where = f"stage '{stage.name}'"
    if not stage.checkpoint:
        raise FileNotFoundError(f"{where}: no checkpoint set (train the stage and set its checkpoint path)")
    step = resolve_committed(stage.checkpoint, f"{where} checkpoint").resolve()
    if stage.distilled:  # the teacher must exist too: it is what the student is compared with
        step = resolve_committed(stage.distilled, f"{where} distilled checkpoint").resolve()
    where = f"{where} ({'distilled' if stage.distilled else 'checkpoint'} {step})"
    run = _read_checkpoint_config(step, where)
    check_stage_model(cascade, index, run.model, where)
    for path in exported_files(step, run):
        if not path.is_file():
            raise FileNotFoundError(f"{where}: {path} is missing (exported weights of the checkpoint)")
    if run.text.encoder == "t5":
        t5 = check_t5_dir(run.text.t5_path).resolve()  # absolute: Ray actors run elsewhere
        run = dataclasses.replace(run, text=dataclasses.replace(run.text, t5_path=str(t5)))
    overrides = stage_sampling(stage, run)
    if guidance_scale is not None:
        overrides.update(guidance_scale=float(guidance_scale), guidance_schedule="constant")
    diffusion = dataclasses.replace(run.diffusion, **overrides)
    return StageSpec(
        index=index,
        stage=stage,
        checkpoint=str(step),
        run=run,
        diffusion=diffusion,
        seed=seed,
        precision=precision,
    )


def prepare_stages(
    cascade: CascadeConfig,
    seed: int,
    first: int = 0,
    guidance_scale: float | None = None,
    precision: str = "fp32",
) -> list[StageSpec]:
    """`prepare_stage` for stages `first`..last, in order: the first failing stage raises."""
    return [
        prepare_stage(cascade, k, seed, guidance_scale, precision) for k in range(first, len(cascade.stages))
    ]


# ---------------------------------------------------------------------------------------------------
# Prompt lengths (tokenizers only)
# ---------------------------------------------------------------------------------------------------


def _t5_tokenizer(path: str):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(check_t5_dir(path), local_files_only=True)


def check_prompt_lengths(specs: list[StageSpec], prompts: list[str], where: list[str]) -> None:
    """ValueError when a prompt is longer than a stage's text encoder takes (it would be cut silently).

    Byte encoder: UTF-8 bytes + 1 (BOS) against text.max_length; T5: tokens (with </s>) against
    text.max_length, from the checkpoint's own tokenizer. `where[i]` names prompt i ("prompt 3 (line
    7 of prompts.txt)").
    """
    tokenizers: dict[str, object] = {}
    for spec in specs:
        text = spec.run.text
        for i, prompt in enumerate(prompts):
            if text.encoder == "byte":
                size = len(prompt.encode("utf-8"))
                if size + 1 > text.max_length:
                    raise ValueError(
                        f"{where[i]} is {size} UTF-8 bytes; stage '{spec.name}' (byte text encoder, "
                        f"text.max_length={text.max_length}) takes at most {text.max_length - 1} bytes "
                        "(one position is the BOS token); shorten it"
                    )
            else:
                if text.t5_path not in tokenizers:
                    tokenizers[text.t5_path] = _t5_tokenizer(text.t5_path)
                count = len(tokenizers[text.t5_path](prompt)["input_ids"])
                if count > text.max_length:
                    raise ValueError(
                        f"{where[i]} is {count} T5 tokens; stage '{spec.name}' (text.max_length="
                        f"{text.max_length}) takes at most {text.max_length}; shorten it"
                    )


# ---------------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------------


class StageRunner:
    """A loaded stage: `run(batch)` samples one output video per item. Used in-process (`--local`) and
    as the body of a Ray actor (`pipeline.ray_render`).

    The model is cast to `spec.precision`; the text encoder stays float32 (it runs once per batch, not
    per sampler step, and `generate` casts its tokens to the model's dtype, leaving the masks alone).
    """

    def __init__(self, spec: StageSpec, device: str | None = None) -> None:
        self.spec = spec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, text = load_exported(Path(spec.checkpoint), spec.run)
        if model.config.kind != spec.stage.kind:
            raise ValueError(
                f"stage '{spec.name}': the exported model of {spec.checkpoint} is a {model.config.kind} "
                f"model, the stage is kind {spec.stage.kind}"
            )
        self.model = model.to(self.device, torch_dtype(spec.precision)).eval()
        self.text = text.to(self.device).eval()

    def run(self, batch: list[StageItem]) -> list[Tensor]:
        """Sample the batch; returns one float32 CPU video (C, T, H, W) in [-1, 1] per item, in order."""
        spec, s = self.spec, self.spec.stage
        if not batch:
            return []
        keys = [(item.index, spec.index) for item in batch]
        cond = aug = None
        if s.kind != "base":
            if any(item.video is None for item in batch):
                raise ValueError(
                    f"stage '{s.name}' ({s.kind}) needs the previous stage's video for every item"
                )
            aug = float(s.cond_aug_level)
            cond = self.condition([item.video for item in batch])
        video = generate(
            self.model,
            self.text,
            [item.prompt for item in batch],
            frames=s.frames,
            height=s.height,
            width=s.width,
            fps=s.fps,
            diffusion=spec.diffusion,
            seed=spec.seed,
            cond=cond,
            cond_aug=aug,
            item_keys=keys,
        )  # (B, C, T, H, W)
        return [v.float().cpu().contiguous() for v in video]

    def condition(self, videos: list[Tensor]) -> Tensor:
        """The SR conditioning: the previous outputs upsampled to the stage shape exactly as in training
        (`generate` noises it to the stage's augmentation level per prompt): float32 (B, C, T, H, W) on
        the model's device. The small input moves there and is upsampled there, so the upsampled video
        is never built on the host (its augmentation noise still comes from each prompt's CPU generator)."""
        s = self.spec.stage
        low = torch.stack([v.float() for v in videos]).to(self.device)  # (B, C, t, h, w)
        return upsample_video(low, s.frames, s.height, s.width)
