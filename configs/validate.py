"""Value checks run at load time, so a bad config fails before any work starts.

Each failure raises ValueError naming the dotted field, the value and what was expected. `validate`
(and `configs.validate_cascade`) first refuse any non-finite float (nan, inf, -inf) in every field,
nested sections included, so the range checks below only ever see finite numbers.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Literal, get_args, get_origin, get_type_hints

from configs.schema import (
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    ParallelConfig,
    PipelineConfig,
    PreprocessConfig,
    RenderConfig,
    RunConfig,
    SynthConfig,
    TextConfig,
    TrainConfig,
)


def check_choice(name: str, value: object, choices: Any) -> None:
    """`value` must be one of the values of the `Literal` type `choices`; the error names `name`."""
    allowed = get_args(choices)
    if value not in allowed:
        raise ValueError(f"{name}: unknown value '{value}'; expected one of {', '.join(allowed)}")


def choice_fields(cls: type) -> dict[str, Any]:
    """The fields of the dataclass `cls` typed with a fixed set of values (a `Literal`), by name."""
    return {name: hint for name, hint in get_type_hints(cls).items() if get_origin(hint) is Literal}


def check_choices(section: Any, prefix: str = "") -> None:
    """Every `Literal`-typed field of the dataclass `section` holds one of its values; errors name
    `{prefix}.{field}` (`{field}` for a top-level config)."""
    for name, hint in choice_fields(type(section)).items():
        check_choice(f"{prefix}.{name}" if prefix else name, getattr(section, name), hint)


def check_finite(section: Any, prefix: str = "") -> None:
    """Every float in the dataclass `section` is finite, through nested sections and the lists and dicts
    holding them; the error names `{prefix}.{field}` (`{field}` for a top-level config), `[i]` for a
    list element and `.{key}` for a dict entry."""
    for f in dataclasses.fields(section):
        _check_finite_value(f"{prefix}.{f.name}" if prefix else f.name, getattr(section, f.name))


def _check_finite_value(name: str, value: object) -> None:
    if dataclasses.is_dataclass(value):
        check_finite(value, name)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite_value(f"{name}[{i}]", item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_finite_value(f"{name}.{key}", item)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """`value` must be > 0 (>= 0 with `allow_zero`); the error names `name`."""
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: got {value}, expected {bound}")


def check_unit_interval(name: str, value: float) -> None:
    """`value` must lie in [0, 1]; the error names `name`."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: got {value}, expected a value in [0, 1]")


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
    """Sizes positive, heads divide the width, rotary dims even, fixed-choice fields known."""
    check_choices(m, prefix)
    if len(m.patch_size) != 3:
        raise ValueError(f"{prefix}.patch_size: got {m.patch_size}, expected three sizes [pt, ph, pw]")
    for i, p in enumerate(m.patch_size):
        check_positive(f"{prefix}.patch_size[{i}]", p)
    for name in ("in_channels", "width", "depth", "heads", "text_dim", "attention_max_batch", "mlp_ratio"):
        check_positive(f"{prefix}.{name}", getattr(m, name))
    check_positive(f"{prefix}.max_fps", m.max_fps)
    if m.width % m.heads:
        raise ValueError(f"{prefix}.width: {m.width} is not divisible by {prefix}.heads={m.heads}")
    head_dim = m.width // m.heads
    if m.pos_embed == "rope" and head_dim % 4:
        raise ValueError(
            f"{prefix}.width/heads = {head_dim}: rope needs a head dim divisible by 4 (2-D spatial rotary)"
        )
    if m.pos_embed == "sincos" and m.width % 8:
        raise ValueError(f"{prefix}.width: {m.width} must be divisible by 8 for sincos positions")
    check_guidance_range(f"{prefix}.guidance_range", m.guidance_range)


def check_guidance_range(name: str, value: list[float]) -> None:
    """[] or [w_min, w_max] with 0 <= w_min < w_max."""
    if value and not (len(value) == 2 and 0 <= value[0] < value[1]):
        raise ValueError(f"{name}: got {list(value)}, expected [] or [w_min, w_max] with 0 <= w_min < w_max")


def _validate_distill(cfg: RunConfig) -> None:
    """A distillation names its teacher; a guidance round (steps 0) needs a guidance-input student."""
    d = cfg.distill
    check_positive("distill.steps", d.steps, allow_zero=True)
    if not d.teacher:
        if d.steps:
            raise ValueError(
                f"distill.steps={d.steps} but distill.teacher is empty; name the teacher to distil"
            )
        if cfg.model.guidance_range:
            raise ValueError(
                "model.guidance_range: a guidance input is learned from a teacher by distillation; set "
                "distill.teacher (and distill.steps=0 for the guidance round)"
            )
        return
    if not d.steps and not cfg.model.guidance_range:
        raise ValueError(
            "distill.steps=0 is a guidance round, which needs model.guidance_range ([w_min, w_max]); "
            "set distill.steps to the student's sampling steps for a progressive round"
        )


def _validate_super_resolution(cfg: RunConfig) -> None:
    """SR factor and the clip, crop and batch kinds a TSR/SSR stage can train on."""
    m, d, crop = cfg.model, cfg.data, cfg.train.crop
    if crop:
        if len(crop) != 2 or min(crop) <= 0:
            raise ValueError(f"train.crop: got {crop}, expected [] or [H, W] with H, W > 0")
        if crop[0] > d.height or crop[1] > d.width:
            raise ValueError(
                f"train.crop: {crop} is larger than the clip {d.height}×{d.width} (data.height/width)"
            )
        _, ph, pw = m.patch_size
        if crop[0] % ph or crop[1] % pw:
            raise ValueError(
                f"train.crop: {crop} is not divisible by the patch ({ph}, {pw}) of model.patch_size"
            )
    if m.kind == "base":
        return
    k = m.sr_factor
    if k < 2:
        raise ValueError(f"model.sr_factor: got {k}, expected an integer >= 2 for a {m.kind} model")
    if m.kind == "tsr":
        if d.frames % k:
            raise ValueError(
                f"data.frames={d.frames} is not a multiple of model.sr_factor={k} "
                "(tsr keeps every k-th frame)"
            )
        if d.image_fraction > 0:
            raise ValueError(
                "data.image_fraction: a tsr model trains on videos only (packed images have no motion)"
            )
        return
    height, width = crop if crop else (d.height, d.width)
    if height % k or width % k:
        what = "train.crop" if crop else "data.height × data.width"
        raise ValueError(
            f"{what} = {height}×{width} is not divisible by model.sr_factor={k} (ssr downsamples by it)"
        )


def _validate_text(t: TextConfig) -> None:
    check_choices(t, "text")
    for name in ("max_length", "width", "depth", "heads"):
        check_positive(f"text.{name}", getattr(t, name))
    if t.encoder == "byte" and t.width % t.heads:
        raise ValueError(f"text.width: {t.width} is not divisible by text.heads={t.heads}")
    if t.encoder == "t5" and not t.t5_path:
        raise ValueError("text.t5_path: required when text.encoder=t5 (a local directory; nothing downloads)")


def _validate_diffusion(d: DiffusionConfig) -> None:
    check_choices(d, "diffusion")
    if d.logsnr_min >= d.logsnr_max:
        raise ValueError(f"diffusion.logsnr_min ({d.logsnr_min}) must be below logsnr_max ({d.logsnr_max})")
    check_positive("diffusion.steps", d.steps)
    check_positive("diffusion.shift_reference_numel", d.shift_reference_numel, allow_zero=True)
    check_positive("diffusion.min_snr_gamma", d.min_snr_gamma)
    check_positive("diffusion.guidance_scale", d.guidance_scale, allow_zero=True)
    check_positive("diffusion.guidance_low", d.guidance_low, allow_zero=True)
    check_unit_interval("diffusion.eta", d.eta)
    check_unit_interval("diffusion.guidance_oscillate_fraction", d.guidance_oscillate_fraction)
    check_unit_interval("diffusion.cond_aug_max", d.cond_aug_max)
    check_unit_interval("diffusion.cond_aug_level", d.cond_aug_level)
    if d.dynamic_threshold and not 0.5 <= d.dynamic_threshold < 1.0:
        raise ValueError(f"diffusion.dynamic_threshold: got {d.dynamic_threshold}, expected 0 or [0.5, 1)")


def _validate_data(d: DataConfig, m: ModelConfig) -> None:
    for name in ("frames", "height", "width", "fps", "batch_size"):
        check_positive(f"data.{name}", getattr(d, name))
    for name in ("num_workers", "images_per_item", "shuffle_buffer", "max_pending"):
        check_positive(f"data.{name}", getattr(d, name), allow_zero=True)
    check_unit_interval("data.image_fraction", d.image_fraction)
    pt, ph, pw = m.patch_size
    for name, size, patch, axis in (
        ("frames", d.frames, pt, 0),
        ("height", d.height, ph, 1),
        ("width", d.width, pw, 2),
    ):
        if size % patch:
            raise ValueError(
                f"data.{name}={size} is not divisible by model.patch_size[{axis}]={patch} "
                f"(patch size {list(m.patch_size)} must divide the clip size)"
            )


def _validate_preprocess(p: PreprocessConfig, m: ModelConfig) -> None:
    check_choices(p, "preprocess")
    for name in ("stride", "max_clips_per_video", "scene_cut_threshold"):
        check_positive(f"preprocess.{name}", getattr(p, name), allow_zero=True)
    for name in (
        "min_source_side",
        "files_per_shard",
        "decode_timeout_s",
        "recycle_after",
        "workers",
        "decode_threads",
    ):
        check_positive(f"preprocess.{name}", getattr(p, name))
    if not 1 <= p.compression_level <= 19 or isinstance(p.compression_level, bool):
        raise ValueError(f"preprocess.compression_level: got {p.compression_level}, expected 1 to 19 (zstd)")
    if not p.split or not p.split.replace("_", "").isalnum():
        raise ValueError(f"preprocess.split: got '{p.split}', expected letters, digits or _")
    if p.resize == "bucket" and not p.buckets:
        raise ValueError("preprocess.buckets: resize=bucket needs a list of [H, W] buckets")
    _, ph, pw = m.patch_size
    for i, bucket in enumerate(p.buckets):
        if len(bucket) != 2 or min(bucket) <= 0 or bucket[0] % ph or bucket[1] % pw:
            raise ValueError(
                f"preprocess.buckets[{i}]: got {bucket}, "
                f"expected [H, W] > 0 divisible by the patch ({ph}, {pw})"
            )


def _validate_train(t: TrainConfig) -> None:
    check_positive("train.steps", t.steps)
    check_positive("train.seed", t.seed, allow_zero=True)
    check_positive("train.lr", t.lr)
    check_positive("train.max_bad_steps", t.max_bad_steps)
    check_positive("train.preview_every", t.preview_every, allow_zero=True)
    check_positive("train.preview_steps", t.preview_steps)
    if t.preview_every and not t.preview_prompts:
        raise ValueError("train.preview_prompts: previews (train.preview_every > 0) need at least one prompt")
    for name in ("warmup_steps", "weight_decay", "grad_clip"):
        check_positive(f"train.{name}", getattr(t, name), allow_zero=True)
    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
        check_positive(f"train.{name}", getattr(t, name))
    check_unit_interval("train.ema_decay", t.ema_decay)
    check_unit_interval("train.text_dropout", t.text_dropout)


def _validate_parallel(p: ParallelConfig) -> None:
    if p.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"parallel.zero_stage: got {p.zero_stage}, expected 0, 1, 2 or 3")
    check_choices(p, "parallel")
    check_positive("parallel.grad_accum", p.grad_accum)
    check_positive("parallel.collective_timeout_s", p.collective_timeout_s)
    check_positive("parallel.sequence_parallel", p.sequence_parallel)


def training_token_grids(cfg: RunConfig) -> list[tuple[str, int, int]]:
    """(what, T', S) of every patch grid a training run's batches can have: its clips (at the training
    crop, or at data.height × width and, bucketed without data.reduce, every preprocess.buckets size)
    and, with data.image_fraction > 0, its packed images (one image per patch frame)."""
    d, p = cfg.data, cfg.preprocess
    pt, ph, pw = cfg.model.patch_size
    if cfg.train.crop:
        sizes = [tuple(cfg.train.crop)]
    else:
        sizes = [(d.height, d.width)]
        if p.resize == "bucket" and not d.reduce:
            sizes += [tuple(bucket) for bucket in p.buckets if tuple(bucket) != (d.height, d.width)]
    grids = [(f"clips of {d.frames}×{h}×{w}", d.frames // pt, (h // ph) * (w // pw)) for h, w in sizes]
    if d.image_fraction > 0:
        images = d.images_per_item or d.frames
        grids += [(f"{images} packed {h}×{w} images", images, (h // ph) * (w // pw)) for h, w in sizes]
    return grids


def check_sequence_parallel(cfg: RunConfig, world: int | None = None) -> None:
    """ValueError unless parallel.sequence_parallel N divides the world size (when known) and T' and S of
    every training grid (`training_token_grids`): the clip is split by frames and, for temporal attention,
    by spatial positions, without padding."""
    n = cfg.parallel.sequence_parallel
    if n == 1:
        return
    grids = training_token_grids(cfg)
    where = "" if world is None else f"world size {world}, "
    if world is not None and world % n:
        _, frames, positions = grids[0]
        raise ValueError(
            f"parallel.sequence_parallel = {n} does not divide the world size {world} (the world is "
            f"data-parallel × sequence-parallel ranks; T' = {frames}, S = {positions})"
        )
    for what, frames, positions in grids:
        if frames % n or positions % n:
            raise ValueError(
                f"parallel.sequence_parallel = {n}: {where}T' = {frames} patch frames and S = {positions} "
                f"spatial tokens ({what}) must both be divisible by {n}; nothing is padded"
            )


def validate_render(r: RenderConfig) -> None:
    """Render settings: batch size, seed, precision and devices (checked by `stages.render` before any
    work)."""
    if r.batch_size < 1:
        raise ValueError(f"render.batch_size: got {r.batch_size}, expected >= 1")
    check_positive("render.seed", r.seed, allow_zero=True)
    _check_integer("render.devices", r.devices, 0)
    check_choices(r, "render")


MAX_SHAPE_SIZE = 0.75
"""Largest `synth.shape_size`: a bigger box leaves the shape too little room to move."""


def _check_integer(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: got {value!r}, expected an integer >= {minimum}")


def _check_number(name: str, value: object, expected: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}: got {value!r}, expected a finite number {expected}")


def validate_synth(s: SynthConfig, prefix: str = "") -> None:
    """The synthetic dataset's settings, for `stages.synth.run_synth` and a pipeline's `synth` section
    (`prefix` "synth."). Values built in code are type-checked too. ValueError naming the field (after
    `prefix`), the value and what was expected."""
    _check_integer(f"{prefix}count", s.count, 1)
    _check_integer(f"{prefix}frames", s.frames, 2)
    _check_integer(f"{prefix}size", s.size, 16)
    if s.size % 2:
        raise ValueError(
            f"{prefix}size: got {s.size}, expected an even size (H.264 yuv420p needs even sides)"
        )
    _check_number(f"{prefix}fps", s.fps, "> 0")
    check_positive(f"{prefix}fps", s.fps)
    _check_integer(f"{prefix}seed", s.seed, 0)
    for name in ("image_fraction", "position_jitter"):
        _check_number(f"{prefix}{name}", getattr(s, name), "in [0, 1]")
        check_unit_interval(f"{prefix}{name}", getattr(s, name))
    _check_number(f"{prefix}shape_size", s.shape_size, f"in (0, {MAX_SHAPE_SIZE}]")
    if not 0.0 < s.shape_size <= MAX_SHAPE_SIZE:
        raise ValueError(f"{prefix}shape_size: got {s.shape_size}, expected a value in (0, {MAX_SHAPE_SIZE}]")


def _validate_pipeline(p: PipelineConfig) -> None:
    """A pipeline's own fields; its run configs and cascade are checked when its graph is built."""
    for name in ("name", "out_dir"):
        if not getattr(p, name).strip():
            raise ValueError(f"{name}: empty; expected a non-empty string")
    if not p.inputs:
        validate_synth(p.synth, prefix="synth.")
    for name, t in p.trainings.items():
        if not t.config:
            raise ValueError(f"trainings.{name}.config: empty; expected run-config YAML files and overrides")
        _validate_pipeline_distill(f"trainings.{name}.distill", t.distill.rounds, t.distill.guidance)
        for field in ("workers", "cpus_per_worker"):
            check_positive(f"trainings.{name}.{field}", getattr(t, field))
        check_positive(f"trainings.{name}.gpus_per_worker", t.gpus_per_worker, allow_zero=True)
        if not 0 <= t.min_workers <= t.workers:
            raise ValueError(
                f"trainings.{name}.min_workers: {t.min_workers}; expected 0 (fixed size) up to workers "
                f"({t.workers})"
            )
    if p.cascade and not p.prompts:
        raise ValueError("prompts: empty; a pipeline with a cascade needs at least one prompt to render")
    if any(not text.strip() for text in p.prompts):
        raise ValueError(f"prompts: blank prompt in {p.prompts}; every prompt needs text")
    validate_render(p.render)


def _validate_pipeline_distill(at: str, rounds: list[int], guidance: list[float]) -> None:
    check_guidance_range(f"{at}.guidance", guidance)
    for i, steps in enumerate(rounds):
        check_positive(f"{at}.rounds[{i}]", steps)
        if i and rounds[i - 1] != 2 * steps:
            raise ValueError(
                f"{at}.rounds: {list(rounds)}; each round halves the steps of the one before "
                f"(expected {rounds[i - 1] / 2:g} after {rounds[i - 1]})"
            )


def validate(cfg: Any) -> None:
    """Check a RunConfig (every section and the rules between them), a ModelConfig, a TextConfig, a
    PipelineConfig or a SynthConfig; non-finite floats first, in any of them."""
    if isinstance(cfg, ModelConfig):
        check_finite(cfg, "model")
        validate_model(cfg)
        return
    if isinstance(cfg, TextConfig):
        check_finite(cfg, "text")
        _validate_text(cfg)
        return
    if not isinstance(cfg, (RunConfig, PipelineConfig, SynthConfig)):
        raise TypeError(f"cannot validate {type(cfg).__name__}")
    check_finite(cfg)
    if isinstance(cfg, PipelineConfig):
        _validate_pipeline(cfg)
        return
    if isinstance(cfg, SynthConfig):
        validate_synth(cfg)
        return
    validate_model(cfg.model)
    _validate_text(cfg.text)
    _validate_diffusion(cfg.diffusion)
    _validate_data(cfg.data, cfg.model)
    _validate_preprocess(cfg.preprocess, cfg.model)
    if cfg.preprocess.text_embeddings and cfg.text.encoder != "t5":
        raise ValueError(
            f"preprocess.text_embeddings: needs a frozen text encoder (text.encoder=t5 with text.t5_path), "
            f"got text.encoder={cfg.text.encoder} (the byte encoder trains with the model)"
        )
    _validate_train(cfg.train)
    _validate_distill(cfg)
    _validate_super_resolution(cfg)
    _validate_parallel(cfg.parallel)
    check_sequence_parallel(cfg)
    validate_render(cfg.render)
    if cfg.text.encoder == "byte" and cfg.model.text_dim != cfg.text.width:
        raise ValueError(
            f"model.text_dim={cfg.model.text_dim} must equal text.width={cfg.text.width} "
            "(the byte encoder's output feeds cross-attention)"
        )
