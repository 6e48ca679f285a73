"""The training stage: one worker function every launcher calls (torchrun, the DeepSpeed launcher,
SLURM, Ray Train). It imports no Ray.

Per process: build the model from the run config, wrap it with `deepspeed.initialize` (config from
`stages/parallelize.py`), stream this rank's shards, and run optimizer steps of v-prediction loss with
classifier-free-guidance text dropout, an fp32 EMA of the weights, committed checkpoints with exact
resume (`stages/checkpoint.py`), a non-finite-loss guard, SIGTERM → checkpoint → exit, and metrics
(`stages/metrics.py`); per-step values stay on the device between log lines (`stages/train_sync.py`).
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from configs import RunConfig, dump_config
from models.diffusion import CosineSchedule, augment_condition, sample_augment_levels, training_loss
from models.dit import VideoDiT
from models.flops import forward_flops, parameter_count, token_grid
from models.superres import degrade, reduce_video
from models.text import ByteTextEncoder, T5TextEncoder
from stages import checkpoint
from stages.distributed import init_distributed
from stages.parallelize import deepspeed_config, lr_factor, parallelize_model
from stages.train_sync import StepRecord, grad_norm_bad, nonfinite, read_means, settled_at_once

# --------------------------------------------------------------------------------------------------
# The module DeepSpeed wraps: the DiT plus the jointly trained byte text encoder (a frozen T5 stays
# outside, so its weights never enter checkpoints or the optimizer)
# --------------------------------------------------------------------------------------------------


class DiffusionTrainer(nn.Module):
    """Per-sample diffusion loss of a batch; holds every trainable parameter."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        self.dit = parallelize_model(VideoDiT(cfg.model), cfg.parallel, compile_blocks=cfg.train.compile)
        t = cfg.text
        self.text = (
            ByteTextEncoder(dim=t.width, depth=t.depth, heads=t.heads, max_length=t.max_length)
            if t.encoder == "byte"
            else None
        )
        self.schedule = CosineSchedule.from_config(
            cfg.diffusion, cfg.data.frames * cfg.data.height * cfg.data.width
        )
        self.diffusion = cfg.diffusion

    def forward(
        self,
        x0: Tensor,
        t: Tensor,
        noise: Tensor,
        *,
        captions: list[str] | None,
        text: Tensor | None,
        text_mask: Tensor | None,
        fps: Tensor,
        drop_text: Tensor,
        segments: Tensor | None = None,
        cond: Tensor | None = None,
        cond_aug: Tensor | None = None,
    ) -> Tensor:
        if text is None:
            if self.text is None:
                raise ValueError("no text embeddings in the batch and no trainable text encoder")
            emb = self.text(captions)
            text, text_mask = emb.tokens.to(x0.dtype), emb.mask
            if drop_text.dim() == 2:  # packed images: one caption per frame
                b, f = drop_text.shape
                text, text_mask = text.view(b, f, *text.shape[1:]), text_mask.view(b, f, -1)
        d = self.diffusion
        return training_loss(
            self.dit,
            x0,
            t,
            noise,
            self.schedule,
            d.prediction,
            d.loss_weighting,
            d.min_snr_gamma,
            text=text,
            text_mask=text_mask,
            fps=fps,
            drop_text=drop_text,
            segments=segments,
            **({} if cond is None else {"cond": cond, "cond_aug": cond_aug}),
        )


# --------------------------------------------------------------------------------------------------
# EMA of the weights, kept in fp32 (under ZeRO-3 each rank keeps the EMA of its own partition)
# --------------------------------------------------------------------------------------------------


def _local(p: Tensor) -> Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


class Ema:
    """fp32 exponential moving average of parameters (or of their ZeRO-3 partitions)."""

    def __init__(self, params: list[nn.Parameter], decay: float) -> None:
        self.params, self.decay = params, decay
        self.shadow = [_local(p).detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(_local(p).detach().float(), 1.0 - self.decay)

    def state(self) -> list[Tensor]:
        return [s.cpu() for s in self.shadow]

    def load(self, state: list[Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state)} tensors, the model {len(self.shadow)}")
        for s, saved in zip(self.shadow, state, strict=True):
            s.copy_(saved)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily put the EMA values into the parameters (their local partitions)."""
        saved = [_local(p).detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params, strict=True):
                _local(p).copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for keep, p in zip(saved, self.params, strict=True):
                    _local(p).copy_(keep)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def full_state(module: nn.Module, zero3: bool) -> dict[str, Tensor] | None:
    """Collective: the full fp32 state dict of `module` on rank 0 (None elsewhere), gathering ZeRO-3."""
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    else:
        state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return state if _rank() == 0 else None


def export_weights(directory: Path, cfg: RunConfig, states: dict[str, dict[str, Tensor]]) -> None:
    """Write `directory/exported/`: config.yaml plus `{name}.safetensors` per state (DiT keys) and
    `{name}_text.safetensors` for a trained byte text encoder; `VideoDiT.from_pretrained(directory /
    "exported", "ema.safetensors")` loads them."""
    from safetensors.torch import save_file

    out = directory / "exported"
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg.model, out / "config.yaml")
    for name, state in states.items():
        dit = {k.removeprefix("dit."): v.contiguous() for k, v in state.items() if k.startswith("dit.")}
        save_file(dit, out / f"{name}.safetensors", metadata={"format": "pt"})
        text = {k.removeprefix("text."): v.contiguous() for k, v in state.items() if k.startswith("text.")}
        if text:
            save_file(text, out / f"{name}_text.safetensors", metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


def plan(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """What a run will do per step, computed from the config alone (the plan printed before training)."""
    d, p = cfg.data, cfg.parallel
    height, width = cfg.train.crop or (d.height, d.width)
    params = parameter_count(cfg.model)
    grid = token_grid(cfg.model, d.frames, height, width)
    global_batch = d.batch_size * p.grad_accum * world_size
    fwd = forward_flops(cfg.model, d.frames, height, width, cfg.text.max_length).total
    # model states per device (DeepSpeed ZeRO accounting): weights, gradients, fp32 master + Adam m, v
    w_bytes = 2 if p.precision in ("bf16", "fp16") else 4
    master = 4 if p.precision in ("bf16", "fp16") else 0
    weights, grads, optim = w_bytes, w_bytes, master + 8
    n = world_size
    if p.zero_stage >= 1:
        optim /= n
    if p.zero_stage >= 2:
        grads /= n
    if p.zero_stage >= 3:
        weights /= n
    if p.offload_optimizer:
        optim = 0
    ema = 4 / (n if p.zero_stage >= 3 else 1)
    return {
        "world_size": world_size,
        "zero_stage": p.zero_stage,
        "precision": p.precision,
        "micro_batch": d.batch_size,
        "grad_accum": p.grad_accum,
        "global_batch": global_batch,
        "parameters": params,
        "tokens_per_sample": math.prod(grid),
        "flops_per_step": 3 * fwd * global_batch,
        "model_state_gib_per_device": params * (weights + grads + optim + ema) / 2**30,
    }


def format_plan(info: dict[str, Any]) -> str:
    rows = [
        ("world size", info["world_size"]),
        ("ZeRO stage", info["zero_stage"]),
        ("precision", info["precision"]),
        (
            "global batch",
            f"{info['global_batch']} = {info['micro_batch']} × {info['grad_accum']} accum × "
            f"{info['world_size']} ranks",
        ),
        ("parameters", f"{info['parameters'] / 1e6:.2f} M"),
        ("tokens per sample", info["tokens_per_sample"]),
        ("FLOPs per step", f"{info['flops_per_step']:.3e} (forward + backward, 3 × forward)"),
        (
            "memory per device",
            f"{info['model_state_gib_per_device']:.3f} GiB of model states "
            "(weights, grads, optimizer, EMA; activations not included)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# --------------------------------------------------------------------------------------------------
# Random state
# --------------------------------------------------------------------------------------------------


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    generator.set_state(state["generator"])


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    step: int
    """Optimizer steps done (including skipped ones)."""
    losses: list[float] = field(default_factory=list)
    """Mean loss of each step this process ran (this rank's micro-batches), NaN for skipped steps."""
    skipped: int = 0
    checkpoint: Path | None = None
    """The last committed checkpoint."""
    preempted: bool = False


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


def _draw(batch: dict[str, Any], gen: torch.Generator, dropout: float) -> tuple[Tensor, Tensor, Tensor]:
    """(t, noise, drop_text) for a batch: per item for videos, per frame for packed images."""
    x = batch["x"]
    b, _, f = x.shape[:3]
    shape = (b,) if batch["kind"] == "video" else (b, f)
    t = torch.rand(shape, generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    drop = torch.rand(shape, generator=gen) < dropout
    return t, noise, drop


def fit_batch(batch: dict[str, Any], cfg: RunConfig, gen: torch.Generator) -> dict[str, Any]:
    """The batch at the stage's training geometry: reduced to data.frames × height × width when
    data.reduce is set (fps divided by the frame stride), then randomly cropped per item to train.crop."""
    x, d, crop = batch["x"], cfg.data, cfg.train.crop
    if d.reduce:
        frames = d.frames if batch["kind"] == "video" else x.shape[2]  # packed images keep every image
        if tuple(x.shape[2:]) != (frames, d.height, d.width):
            stride = x.shape[2] // frames
            x = reduce_video(x, frames, d.height, d.width)
            if batch["kind"] == "video":
                batch = {**batch, "fps": batch["fps"] / stride}
    if crop:
        height, width = x.shape[-2:]
        if height < crop[0] or width < crop[1]:
            raise ValueError(f"train.crop {crop} is larger than the batch's {height}×{width} frames")
        ys = torch.randint(0, height - crop[0] + 1, (x.shape[0],), generator=gen).tolist()
        xs = torch.randint(0, width - crop[1] + 1, (x.shape[0],), generator=gen).tolist()
        x = torch.stack([v[..., y : y + crop[0], c : c + crop[1]] for v, y, c in zip(x, ys, xs)])
    return {**batch, "x": x}


def sr_pair(
    x: Tensor, cfg: RunConfig, schedule: CosineSchedule, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """(residual, cond, level) of a super-resolution batch of target clips `x`.

    The upsampled input `up = degrade(x)` (models.superres) is what the stage will receive at render time;
    the model denoises the residual `x - up` and sees `up` noised to a level drawn uniformly from
    [0, diffusion.cond_aug_max] per item, which it is also given.
    """
    levels = sample_augment_levels(x.shape[0], cfg.diffusion.cond_aug_max, gen)
    up = degrade(x, cfg.model.kind, cfg.model.sr_factor)
    return x - up, augment_condition(up, levels, schedule, gen), levels


def train(
    cfg: RunConfig,
    *,
    resume: str = "auto",
    progress: bool = True,
    fault: Callable[[int], bool] | None = None,
) -> TrainResult:
    """Run (or continue) training as one process of the launcher's world; every rank calls this.

    resume: "auto" (newest committed checkpoint of train.out_dir, or a fresh start when it has none),
    "none", or a checkpoint directory. `fault(step)` → True makes that step's loss NaN (tests).
    """
    import deepspeed

    from stages.data import loader_from_config
    from stages.metrics import TrainMetrics
    from stages.previews import write_previews

    rank, world, local = init_distributed()
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    t = cfg.train
    out = Path(t.out_dir)
    zero3 = cfg.parallel.zero_stage == 3
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.parallel.precision, torch.float32)

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    np.random.seed(t.seed)
    random.seed(t.seed)
    module = DiffusionTrainer(cfg)
    trainable = [p for p in module.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(
        model=module,
        model_parameters=trainable,
        config=deepspeed_config(cfg, world),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, t.warmup_steps, t.steps)
        ),
        dist_init_required=False,
    )
    frozen_text = (
        T5TextEncoder(cfg.text.t5_path, cfg.text.max_length).to(device) if cfg.text.encoder == "t5" else None
    )
    ema = Ema([p for p in engine.module.parameters() if p.requires_grad], t.ema_decay)
    loader = loader_from_config(cfg, rank, world)
    gen = torch.Generator().manual_seed(t.seed * 1_000_003 + rank)

    step, last = 0, None
    start = checkpoint.resolve_resume(out, resume)
    if start is not None:
        step, state = checkpoint.load(engine, start, rank, world)
        set_rng_state(state["rng"], gen)
        loader.load_state_dict(state["loader"])
        ema.load(state["ema"])
        last = start
    info = plan(cfg, world)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(format_plan(info) + (f"\nresuming from {start} (step {step})" if start else ""), flush=True)

    stop = {"signal": False}
    # Python takes signal handlers only on the main thread; a launcher that runs train() on another
    # thread (Ray Train) handles SIGTERM itself, by restarting from the last committed checkpoint.
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True)) if on_main else None
    metrics = TrainMetrics(
        out, rank=rank, total_steps=t.steps, start_step=step, log_every=t.log_every, progress=progress
    )
    result = TrainResult(step=step, checkpoint=last)
    losses_log: list[float | Tensor] = []  # result.losses; a step's tensor is read at the next log line
    config_yaml = dump_config(cfg)
    in_a_row = 0

    def ema_state() -> dict[str, Tensor] | None:
        with ema.applied():
            return full_state(engine.module, zero3)

    def save(at: int) -> Path:
        finite = all(bool(torch.isfinite(_local(p)).all()) for p in trainable)
        if nonfinite([torch.tensor(0.0 if finite else float("nan"))])[0]:
            raise NonFiniteError(f"step {at}: the weights are not finite; not saving a checkpoint")
        states = {"model": full_state(engine.module, zero3), "ema": ema_state()}
        rank_state = {"rng": rng_state(gen), "loader": loader.state_dict(), "ema": ema.state()}
        meta = {
            "world_size": world,
            "zero_stage": cfg.parallel.zero_stage,
            "precision": cfg.parallel.precision,
        }
        return checkpoint.save(
            engine,
            out,
            at,
            rank,
            rank_state,
            meta,
            config_yaml,
            t.keep_checkpoints,
            exports=lambda d: export_weights(d, cfg, states),
        )

    def finish(done: StepRecord, grad_bad: bool) -> None:
        """Settle a step: skip accounting (and the max_bad_steps stop), or the EMA update; then metrics.
        The weights are still the step's own here, also when this runs during the next step's forward."""
        nonlocal in_a_row
        bad = done.bad or grad_bad  # grad_bad: DeepSpeed skipped (fp16 overflow) or the gradient blew up
        if bad:
            result.skipped += 1
            in_a_row += 1
            losses_log.append(float("nan"))
            if in_a_row >= t.max_bad_steps:
                raise NonFiniteError(
                    f"{in_a_row} non-finite steps in a row (train.max_bad_steps = {t.max_bad_steps}); "
                    f"stopping without saving; last committed checkpoint: {result.checkpoint}"
                )
        else:
            in_a_row = 0
            ema.update()
            losses_log.append(torch.stack(done.losses))
        metrics.step(
            done.step - 1,  # the metrics log counts steps from 0
            loss=losses_log[-1],
            samples=done.samples,
            tokens=done.tokens,
            lr=done.lr,
            grad_norm=done.grad_norm,
            skipped=bad,
            timestep_losses=done.timestep_losses(),
            data_wait_s=done.wait,
        )
        if bad or done.step % t.log_every == 0 or done.step >= t.steps:
            read_means(losses_log)  # the log boundary: this process's losses come to the host too

    # One wait for the device per step (per micro-batch with accumulation): the loss check, which also
    # settles the previous step's gradient norm; see stages/train_sync.py.
    batches = iter(loader)
    preview_clips = None  # super-resolution previews upsample the run's first batch
    pending: StepRecord | None = None  # the previous step, while its gradient-norm verdict is on the device
    try:
        while step < t.steps and not stop["signal"]:
            current = StepRecord()
            for _ in range(cfg.parallel.grad_accum):
                tick = time.perf_counter()
                batch = fit_batch(next(batches), cfg, gen)
                current.wait += time.perf_counter() - tick
                if preview_clips is None:
                    preview_clips = batch
                tt, noise, drop = _draw(batch, gen, t.text_dropout)
                x0, cond, aug = batch["x"], None, None
                if cfg.model.kind != "base":
                    x0, cond, aug = sr_pair(x0, cfg, module.schedule, gen)
                text, mask = batch["text"], batch["text_mask"]
                if text is None and frozen_text is not None:
                    text, mask = _encode_frozen(frozen_text, batch)
                per_sample = engine(
                    x0.to(device, dtype),
                    tt.to(device),
                    noise.to(device, dtype),
                    captions=_flat_captions(batch),
                    text=None if text is None else text.to(device, dtype),
                    text_mask=None if mask is None else mask.to(device),
                    fps=batch["fps"].to(device),
                    drop_text=drop.to(device),
                    segments=None if batch["segments"] is None else batch["segments"].to(device),
                    cond=None if cond is None else cond.to(device, dtype),
                    cond_aug=None if aug is None else aug.to(device),
                )
                loss = per_sample.mean()
                if fault is not None and fault(step):
                    loss = loss * float("nan")
                if not current.bad:
                    checks = [loss] if pending is None else [loss, pending.grad_norm]
                    verdicts = nonfinite(checks)  # the step's wait for the device
                    if pending is not None:
                        finish(pending, grad_bad=verdicts[1])
                        pending = None
                    current.bad = verdicts[0]
                if current.bad:
                    if cfg.parallel.grad_accum == 1:
                        continue  # nothing accumulated: skip backward and the optimizer entirely
                    loss = sum((p * 0).sum() for p in trainable)  # exact zero gradient keeps DS in step
                engine.backward(loss)
                engine.step()
                current.losses.append(loss.detach())
                current.times.append(tt.reshape(len(per_sample), -1).mean(1))
                current.sample_losses.append(per_sample.detach())
                current.samples += batch["x"].shape[0] * world
                current.tokens += info["tokens_per_sample"] * batch["x"].shape[0] * world
            step += 1
            current.step, current.lr = step, scheduler.get_last_lr()[0]
            grad_norm = engine.get_global_grad_norm()
            current.grad_norm = grad_norm.detach().clone() if isinstance(grad_norm, Tensor) else grad_norm
            if isinstance(current.grad_norm, Tensor) and not current.bad and not settled_at_once(step, t):
                pending = current  # settled on the next step's sync, before its backward
            else:
                finish(current, grad_bad=not current.bad and grad_norm_bad(current.grad_norm))
            if t.preview_every and step % t.preview_every == 0:
                state = ema_state()  # collective under ZeRO-3
                if rank == 0:
                    write_previews(state, cfg, step, frozen_text, device, preview_clips)
            if step % t.checkpoint_every == 0 or step == t.steps:
                result.checkpoint = save(step)
        if pending is not None:  # SIGTERM stopped the loop before the next step's sync
            finish(pending, grad_bad=grad_norm_bad(pending.grad_norm))
            pending = None
        if stop["signal"]:
            if result.checkpoint is None or result.checkpoint.name != checkpoint.step_dir(out, step).name:
                result.checkpoint = save(step)
            result.preempted = True
    finally:
        metrics.close()
        if on_main:
            signal.signal(signal.SIGTERM, previous)
    read_means(losses_log)
    result.losses = [float(loss) for loss in losses_log]  # all floats already: no device read here
    result.step = step
    return result


def _flat_captions(batch: dict[str, Any]) -> list[str]:
    caps = batch["captions"]
    return [c for item in caps for c in item] if batch["kind"] != "video" else list(caps)


@torch.no_grad()
def _encode_frozen(encoder: T5TextEncoder, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    emb = encoder(_flat_captions(batch))
    if batch["kind"] == "video":
        return emb.tokens, emb.mask
    b, f = batch["x"].shape[0], batch["x"].shape[2]
    return emb.tokens.view(b, f, *emb.tokens.shape[1:]), emb.mask.view(b, f, -1)
