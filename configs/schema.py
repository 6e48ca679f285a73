"""The typed run configuration: one dataclass per component, defaults in one place.

Every field carries a one-line docstring (the string literal under it); `docs/CONFIG.md` is generated
from them. YAML files are overlays merged strictly onto these defaults by `configs.loader`, and
cross-field rules are checked by `configs.validate`.

Fields with a fixed set of values are typed with the `Literal` aliases below, the one place their
values are listed (a cascade stage shares the model's and the sampler's). Literal rather than Enum:
OmegaConf (2.4 and later) takes Literal fields in structured configs and refuses any other value when a
YAML file or override is merged, while the values stay plain strings, so YAML files, `dump_config` →
`load_config` round trips and fingerprints (hashes of `dataclasses.asdict`) are those of `str` fields.
`configs.validate` checks the same values, read with `typing.get_args`, on configs built in code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# ------------------------------------------------------------------------------ fixed sets of values

ModelKind = Literal["base", "tsr", "ssr"]
"""What a model generates: base (text → video), tsr or ssr (temporal / spatial super-resolution)."""
PosEmbed = Literal["rope", "sincos"]
"""How a model encodes token positions."""
AttentionKernel = Literal["xformers", "sdpa", "naive"]
"""The attention implementations `models.attention` runs."""
AttentionBackend = Literal["auto", AttentionKernel]
"""A configured attention backend: a kernel, or auto (chosen per device)."""
TextEncoderKind = Literal["byte", "t5"]
"""The text encoders `models.text` builds."""
Prediction = Literal["v", "eps", "x0"]
"""What a diffusion model predicts."""
LossWeighting = Literal["none", "min_snr"]
"""Per-timestep weightings of the diffusion loss."""
SamplerName = Literal["ddpm", "ddim", "dpmpp_2m"]
"""The samplers of `models.diffusion.samplers`."""
GuidanceSchedule = Literal["constant", "oscillating"]
"""How the classifier-free guidance weight varies over the sampling steps."""
TrainPrecision = Literal["fp32", "bf16", "fp16"]
"""Training precisions."""
RenderPrecision = Literal["fp32", "bf16"]
RenderDevice = Literal["auto", "cuda", "cpu"]
"""Dtypes a cascade's models sample in."""
ResizeMode = Literal["crop", "bucket"]
"""How preprocessing fits a clip to the training geometry."""
DecoderName = Literal["auto", "decord", "pyav"]
ShardCompression = Literal["none", "zstd"]
"""Video decoders of preprocessing (auto: decord, PyAV fallback)."""


@dataclass
class ModelConfig:
    """The factorized space-time diffusion transformer."""

    preset: str = ""
    """Size preset (tiny, S, B, L, XL) filling width/depth/heads; explicit values still win."""
    kind: ModelKind = "base"
    """base (text → video), tsr (temporal super-resolution) or ssr (spatial super-resolution)."""
    sr_factor: int = 2
    """Super-resolution factor: tsr multiplies frames and fps by it, ssr height and width (base: unused)."""
    in_channels: int = 3
    """Channels of the video being denoised (3 for RGB pixel space)."""
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    """Spatio-temporal patch (pt, ph, pw)."""
    width: int = 64
    """Model width D."""
    depth: int = 2
    """Number of transformer blocks."""
    heads: int = 4
    """Attention heads; width must be divisible by heads."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of the model width."""
    text_dim: int = 64
    """Width of the text-token embeddings fed to cross-attention (the text encoder's output)."""
    temporal_layers: bool = True
    """Build temporal attention; false gives an image model whose weights load into a video model."""
    pos_embed: PosEmbed = "rope"
    """Positions: rope (factorized 2-D spatial + 1-D temporal rotary) or sincos (factorized absolute)."""
    attention_backend: AttentionBackend = "auto"
    """Attention kernel; auto takes xformers when importable and on CUDA, else sdpa."""
    attention_max_batch: int = 32768
    """Largest batch per attention kernel call; larger batches (e.g. B·S temporal) are chunked."""
    max_fps: float = 120.0
    """Largest frame rate the fps embedding is scaled for."""
    guidance_range: list[float] = field(default_factory=list)
    """[w_min, w_max] of a guidance-distilled model, which takes the guidance weight as input; [] = none."""


@dataclass
class TextConfig:
    """The text encoder producing cross-attention tokens."""

    encoder: TextEncoderKind = "byte"
    """byte (built-in byte-level transformer, trained jointly) or t5 (frozen, from t5_path)."""
    t5_path: str = ""
    """Local directory of a Hugging Face T5 encoder and tokenizer (nothing is downloaded)."""
    max_length: int = 64
    """Maximum text tokens per prompt."""
    width: int = 64
    """Width of the byte-level encoder (ignored for t5, whose width is its d_model)."""
    depth: int = 2
    """Layers of the byte-level encoder."""
    heads: int = 4
    """Heads of the byte-level encoder."""


@dataclass
class DiffusionConfig:
    """Noise schedule, parameterization, loss and sampling."""

    prediction: Prediction = "v"
    """What the model predicts: v (default, as in Imagen Video), eps or x0."""
    logsnr_min: float = -15.0
    """Log-SNR at t = 1 before the shift."""
    logsnr_max: float = 15.0
    """Log-SNR at t = 0 before the shift."""
    shift_reference_numel: int = 0
    """T·H·W at which the schedule is unshifted; 0 disables the resolution/length shift."""
    loss_weighting: LossWeighting = "none"
    """Per-timestep loss weighting: none (uniform) or min_snr (Min-SNR-γ)."""
    min_snr_gamma: float = 5.0
    """γ of Min-SNR weighting."""
    sampler: SamplerName = "ddim"
    """Sampling algorithm: ddpm (ancestral), ddim or dpmpp_2m (DPM-Solver++ 2M)."""
    steps: int = 50
    """Sampling steps."""
    eta: float = 0.0
    """DDIM η (0 deterministic, 1 ancestral)."""
    guidance_scale: float = 4.0
    """Classifier-free guidance weight (1 disables guidance)."""
    guidance_schedule: GuidanceSchedule = "constant"
    """constant or oscillating (Imagen Video: high weight first, then alternating high/low)."""
    guidance_low: float = 1.0
    """The low weight of the oscillating schedule."""
    guidance_oscillate_fraction: float = 0.5
    """Oscillating schedule: share of the (final) steps that alternate high/low; earlier steps stay high."""
    dynamic_threshold: float = 0.0
    """Percentile for Imagen dynamic thresholding of x0 predictions; 0 disables."""
    cond_aug_max: float = 0.5
    """Super-resolution: largest conditioning-augmentation level drawn in training."""
    cond_aug_level: float = 0.1
    """Super-resolution: fixed conditioning-augmentation level used at sampling."""


@dataclass
class DataConfig:
    """Clip geometry and loading."""

    frames: int = 8
    """Frames per clip T (1 = images)."""
    height: int = 32
    """Frame height H in pixels."""
    width: int = 32
    """Frame width W in pixels."""
    fps: float = 8.0
    """Target frame rate of the clips."""
    shards: str = ""
    """Directory of preprocessed webdataset shards."""
    batch_size: int = 2
    """Micro-batch size per rank."""
    num_workers: int = 0
    """Data-loader worker processes per rank."""
    image_fraction: float = 0.0
    """Probability that a batch is packed images (frames of independent images) instead of videos."""
    images_per_item: int = 0
    """Images packed along the frame axis of one batch item; 0 = data.frames."""
    shuffle_buffer: int = 256
    """Samples held per worker (and kind) in the shuffle buffer."""
    max_pending: int = 0
    """Bound on samples waiting in shape buckets before a smaller batch is emitted; 0 = 4 × batch_size."""
    reduce: bool = False
    """Shrink larger clips to frames × height × width (k-th frames, antialiased): one cascade, one dataset."""
    allow_pipe: bool = False
    """Allow `pipe:` shard URLs (they run shell commands); off by default."""


@dataclass
class PreprocessConfig:
    """Turning videos and images into patch shards (clip geometry comes from `data`, patches from `model`)."""

    out: str = ""
    """Output directory (shards/, manifest.json, failures.jsonl, lineage.jsonl)."""
    split: str = "train"
    """Split name used in shard file names: {split}-000000.tar."""
    stride: int = 0
    """Frames (at the target fps) between clip starts; 0 = data.frames (non-overlapping clips)."""
    max_clips_per_video: int = 8
    """Cap on clips taken from one video (0 = no cap)."""
    scene_cut_threshold: float = 40.0
    """Mean absolute difference (0-255) of 32×32 grey thumbnails that marks a cut; 0 disables."""
    resize: ResizeMode = "crop"
    """crop (resize the short side, center crop to data.height × data.width) or bucket."""
    buckets: list[list[int]] = field(default_factory=list)
    """Aspect-ratio buckets [[H, W], ...] for resize=bucket; each clip goes to the nearest ratio."""
    min_source_side: int = 8
    """Inputs whose shorter side is below this many pixels fail as too small."""
    files_per_shard: int = 16
    """Input files per shard (a shard is the unit of work and of resume)."""
    decode_timeout_s: float = 120.0
    """A file taking longer to decode is killed and recorded as failed."""
    recycle_after: int = 64
    """Files a decode process handles before it is replaced (bounds native-memory growth)."""
    workers: int = 2
    """Parallel shard writers (Ray actors, or local processes without Ray)."""
    decoder: DecoderName = "auto"
    """Video decoder: auto (decord, PyAV fallback), decord or pyav."""
    decode_threads: int = 1
    """Decoder threads per worker (decord / PyAV); keep workers × threads at about the CPU count."""
    text_embeddings: bool = False
    """Store each caption's frozen T5 embedding (text.encoder=t5) in its sample, so training skips T5."""
    compression: ShardCompression = "zstd"
    """Patch arrays in the shards: zstd (lossless .npy.zst, read transparently) or none (raw .npy)."""
    compression_level: int = 3
    """zstd level, 1 (fastest) to 19 (smallest), for compression=zstd."""


@dataclass
class TrainConfig:
    """Optimization and checkpointing."""

    steps: int = 1000
    """Optimizer steps."""
    lr: float = 1e-4
    """Peak learning rate."""
    warmup_steps: int = 100
    """Linear warm-up steps before cosine decay."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    ema_decay: float = 0.9999
    """EMA decay of the weights (kept in fp32)."""
    text_dropout: float = 0.1
    """Probability of dropping the text to the null embedding (classifier-free guidance)."""
    seed: int = 0
    """Global random seed."""
    out_dir: str = "runs/default"
    """Where checkpoints, logs and weights go."""
    log_every: int = 10
    """Steps between metric log lines."""
    checkpoint_every: int = 500
    """Steps between checkpoints."""
    keep_checkpoints: int = 3
    """How many committed checkpoints to keep."""
    max_bad_steps: int = 5
    """Non-finite steps in a row (each skipped) after which training stops without saving."""
    preview_every: int = 0
    """Steps between previews sampled from the EMA weights (0 = none)."""
    preview_prompts: list[str] = field(
        default_factory=lambda: ["a red circle moving right", "a blue square moving up", "a green triangle"]
    )
    """Prompts of the previews (an mp4 each and a contact sheet under train.out_dir/previews/)."""
    preview_steps: int = 20
    """Sampler steps of the previews."""
    crop: list[int] = field(default_factory=list)
    """[H, W] random crop per training clip (high-res SSR trains on crops, samples full frames); [] = none."""
    compile: bool = False
    """torch.compile each transformer block (regional compilation) before DeepSpeed wraps the model."""


@dataclass
class DistillConfig:
    """Progressive distillation (`models.diffusion.distill`): the model learns from a frozen teacher."""

    teacher: str = ""
    """The teacher: a training out_dir (newest committed checkpoint) or step dir; "" = no distillation."""
    steps: int = 0
    """Sampling steps the student learns (a DDIM step for two of the teacher's); 0: a guidance round."""


@dataclass
class ParallelConfig:
    """How training is distributed and what precision it uses."""

    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    precision: TrainPrecision = "fp32"
    """Training precision: fp32, or DeepSpeed's bf16 or fp16 (with loss scaling) mode."""
    grad_accum: int = 1
    """Gradient-accumulation steps."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward pass to save memory."""
    offload_optimizer: bool = False
    """Keep optimizer state on the CPU (ZeRO-Offload)."""
    deepspeed_config: str = ""
    """Optional user DeepSpeed JSON, checked against this config."""
    collective_timeout_s: float = 600.0
    """Seconds a collective or a training step may wait for a peer before this rank names it and exits."""
    sequence_parallel: int = 1
    """Ranks that split each clip's tokens (sequence parallelism); must divide the world size, T' and S."""


@dataclass
class RenderConfig:
    """Offline rendering."""

    out_dir: str = "renders"
    """Where videos and sidecars go."""
    seed: int = 0
    """Sampling seed."""
    batch_size: int = 1
    """Prompts sampled together per stage."""
    save_intermediate: bool = True
    """Also write each earlier stage's video as an mp4 (float outputs of every stage are kept for resume)."""
    contact_sheet: bool = True
    """Write a PNG contact sheet per prompt (one row per stage, frames across)."""
    precision: RenderPrecision = "fp32"
    """fp32 or bf16: dtype of the stage models while sampling (sampler state and outputs stay float32)."""
    devices: int = 0
    """Devices for stage replicas, split between stages by cost (--gpus, --workers); 0: one per stage."""
    device: RenderDevice = "auto"
    """Where replicas run: cuda (a GPU each, shared if devices < stages), cpu, auto (cuda if Ray has GPUs)."""


@dataclass
class CascadeStageConfig:
    """One stage of a rendering cascade (`configs/cascade/*.yaml`): its model, output shape and sampler."""

    name: str = ""
    """Stage name, unique in the cascade (used in output file names and `upscale --from-stage`)."""
    kind: ModelKind = "base"
    """base (text → video; only the first stage), tsr or ssr."""
    checkpoint: str = ""
    """A training out_dir (newest committed checkpoint) or a committed step dir; empty until trained."""
    distilled: str = ""
    """A distillation out_dir of this stage's model: sampled instead, at its own step count; "" = none."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape for `render --plan` while there is no checkpoint (a checkpoint's own config wins)."""
    frames: int = 8
    """Output frames T."""
    height: int = 32
    """Output height H in pixels."""
    width: int = 32
    """Output width W in pixels."""
    fps: float = 8.0
    """Output frame rate (0 for still images)."""
    # the sampler's settings default to the `diffusion` section's
    sampler: SamplerName = DiffusionConfig.sampler
    """Sampling algorithm (as diffusion.sampler)."""
    steps: int = DiffusionConfig.steps
    """Sampling steps."""
    guidance_scale: float = DiffusionConfig.guidance_scale
    """Classifier-free guidance weight (1 disables guidance)."""
    guidance_schedule: GuidanceSchedule = DiffusionConfig.guidance_schedule
    """constant or oscillating (high weight first, then alternating with guidance_low)."""
    guidance_low: float = DiffusionConfig.guidance_low
    """The low weight of the oscillating schedule."""
    cond_aug_level: float = DiffusionConfig.cond_aug_level
    """Super-resolution: conditioning-augmentation level applied to the previous stage's output."""


@dataclass
class CascadeConfig:
    """An ordered cascade: a base stage, then temporal / spatial super-resolution stages."""

    name: str = "cascade"
    """Cascade name (recorded in each video's sidecar)."""
    stages: list[CascadeStageConfig] = field(default_factory=list)
    """The stages in order; each stage's input is the previous stage's output."""


@dataclass
class RunConfig:
    """A whole run: every component's config."""

    name: str = "run"
    """Run name, used in output paths."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The diffusion transformer."""
    text: TextConfig = field(default_factory=TextConfig)
    """The text encoder."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Schedule, loss and sampler."""
    data: DataConfig = field(default_factory=DataConfig)
    """Clip geometry and loading."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """Dataset preprocessing."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimization and checkpointing."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Progressive distillation from a teacher (off unless distill.teacher is set)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Distribution and precision."""
    render: RenderConfig = field(default_factory=RenderConfig)
    """Offline rendering."""


@dataclass
class SynthConfig:
    """The synthetic captioned dataset (`stages.synth`) a pipeline writes when it has no inputs."""

    count: int = 192
    """Files to write (videos and images); every (colour, shape, direction) appears once 48 are videos."""
    frames: int = 16
    """Frames per video."""
    size: int = 64
    """Frame height and width in pixels."""
    fps: float = 8.0
    """Frame rate of the videos."""
    seed: int = 0
    """Seed of the whole dataset, its bytes included."""
    image_fraction: float = 0.25
    """Share of the files that are still images."""
    position_jitter: float = 1.0
    """Spread of shape positions about the frame's centre line, in [0, 1]: 1 = anywhere, 0 = on it."""
    shape_size: float = 1 / 3
    """Side of a shape's box as a share of the frame's side, in (0, 0.75]."""


@dataclass
class PipelineDistillConfig:
    """The distillation rounds a pipeline runs after one of its trainings, each a training of its own."""

    rounds: list[int] = field(default_factory=list)
    """Student steps per round, each half the one before (e.g. [8, 4]: teacher 16 → 8 → 4); [] = none."""
    guidance: list[float] = field(default_factory=list)
    """[w_min, w_max]: first a round that folds classifier-free guidance into the model; [] = none."""
    config: list[str] = field(default_factory=list)
    """Run-config YAML files and overrides applied to every round, after the training's own (train.steps…)."""


@dataclass
class PipelineTrainingConfig:
    """One model a pipeline trains, with the run config `pipeline train` would take."""

    config: list[str] = field(default_factory=list)
    """Run-config YAML files and key=value overrides, in order; data.shards and train.out_dir are set."""
    workers: int = 1
    """Ray Train workers (ranks) of this training (the default of `train --ray --workers` too)."""
    min_workers: int = 0
    """Elastic if 0 < it < workers: a group restarted after a failure may have this few ranks; 0: fixed."""
    cpus_per_worker: int = 1
    """CPUs Ray reserves per worker (also its torch thread count)."""
    gpus_per_worker: float = 0.0
    """GPUs per worker (0 on CPU machines)."""
    wait_for_workers_s: float = 600.0
    """Seconds each start of a worker group waits for its resources; 4 such starts fail the training."""
    distill: PipelineDistillConfig = field(default_factory=PipelineDistillConfig)
    """Distillation rounds after this training (their student renders in its cascade stage)."""


@dataclass
class PipelineConfig:
    """An end-to-end run (`pipeline run`): dataset → preprocess → trainings → render → report."""

    name: str = "pipeline"
    """Run name (the report's title)."""
    out_dir: str = "runs/pipeline"
    """Run directory: every stage's outputs, the stage records (pipeline/) and index.html."""
    inputs: list[str] = field(default_factory=list)
    """Videos and images to ingest (folders, globs, .csv/.jsonl manifests, .tar); [] = synthesize."""
    synth: SynthConfig = field(default_factory=SynthConfig)
    """The synthetic dataset, used when inputs is empty."""
    preprocess: list[str] = field(default_factory=list)
    """Run-config YAML files and key=value overrides of the preprocess stage; preprocess.out is set."""
    trainings: dict[str, PipelineTrainingConfig] = field(default_factory=dict)
    """Models to train, by name; a cascade stage of the same name renders with the model trained here."""
    cascade: str = ""
    """Cascade YAML rendered after training ("" = no render stage)."""
    cascade_overrides: list[str] = field(default_factory=list)
    """Overrides of the cascade (e.g. stages.1.steps=8)."""
    prompts: list[str] = field(default_factory=list)
    """Prompts rendered through the cascade, one video each."""
    render: RenderConfig = field(default_factory=RenderConfig)
    """The render stage's settings; render.out_dir is set by the pipeline, to {out_dir}/renders."""
