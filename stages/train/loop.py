"""The training stage: one worker function every launcher calls (torchrun, the DeepSpeed launcher,
SLURM, Ray Train). It imports no Ray.

Per process: build the model from the run config, wrap it with `deepspeed.initialize` (config from
`stages/train/parallelize.py`), stream this rank's shards, and run optimizer steps of v-prediction loss
with classifier-free-guidance text dropout, an fp32 EMA of the weights, committed checkpoints with
exact resume (`stages/train/checkpoint.py`), a non-finite-loss guard, SIGTERM → checkpoint → exit, and
metrics (`stages/train/metrics.py`); per-step values stay on the device between log lines
(`stages/train/sync.py`).
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from configs import RunConfig, dump_config
from models.text import T5TextEncoder
from stages.artifacts import export_weights, step_dir
from stages.precision import torch_dtype
from stages.train import checkpoint
from stages.train.batches import draw_noise, encode_frozen, fit_batch, sr_pair
from stages.train.distributed import init_distributed
from stages.train.parallelize import deepspeed_config, lr_factor
from stages.train.plan import format_training_plan, training_plan
from stages.train.sync import StepRecord, grad_norm_bad, nonfinite, read_means, settled_at_once
from stages.train.trainer import DiffusionTrainer, Ema, full_state, local_tensor


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

    from stages.shards.loader import loader_from_config
    from stages.train.metrics import TrainMetrics
    from stages.train.previews import write_previews

    rank, world, local = init_distributed()
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    t = cfg.train
    out = Path(t.out_dir)
    zero3 = cfg.parallel.zero_stage == 3
    dtype = torch_dtype(cfg.parallel.precision)

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
    frozen_text = T5TextEncoder.from_config(cfg.text).to(device) if cfg.text.encoder == "t5" else None
    ema = Ema([p for p in engine.module.parameters() if p.requires_grad], t.ema_decay)
    loader = loader_from_config(cfg, rank, world)
    gen = torch.Generator().manual_seed(t.seed * 1_000_003 + rank)

    step, last = 0, None
    start = checkpoint.resolve_resume(out, resume)
    if start is not None:
        step, state = checkpoint.load(engine, start, rank, world)
        checkpoint.set_rng_state(state["rng"], gen)
        loader.load_state_dict(state["loader"])
        ema.load(state["ema"])
        last = start
    info = training_plan(cfg, world)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(
            format_training_plan(info) + (f"\nresuming from {start} (step {step})" if start else ""),
            flush=True,
        )

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
        finite = all(bool(torch.isfinite(local_tensor(p)).all()) for p in trainable)
        if nonfinite([torch.tensor(0.0 if finite else float("nan"))])[0]:
            raise NonFiniteError(f"step {at}: the weights are not finite; not saving a checkpoint")
        states = {"model": full_state(engine.module, zero3), "ema": ema_state()}
        rank_state = {"rng": checkpoint.rng_state(gen), "loader": loader.state_dict(), "ema": ema.state()}
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
                tt, noise, drop = draw_noise(batch, gen, t.text_dropout)
                x0, cond, aug = batch.x, None, None
                if cfg.model.kind != "base":
                    x0, cond, aug = sr_pair(x0, cfg, module.schedule, gen)
                text, mask = batch.text, batch.text_mask
                if text is None and frozen_text is not None:
                    text, mask = encode_frozen(frozen_text, batch)
                per_sample = engine(
                    x0.to(device, dtype),
                    tt.to(device),
                    noise.to(device, dtype),
                    captions=batch.flat_captions(),
                    text=None if text is None else text.to(device, dtype),
                    text_mask=None if mask is None else mask.to(device),
                    fps=batch.fps.to(device),
                    drop_text=drop.to(device),
                    segments=None if batch.segments is None else batch.segments.to(device),
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
                current.samples += batch.x.shape[0] * world
                current.tokens += info["tokens_per_sample"] * batch.x.shape[0] * world
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
            if result.checkpoint is None or result.checkpoint.name != step_dir(out, step).name:
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
