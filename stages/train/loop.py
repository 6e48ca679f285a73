"""The training stage: one worker function every launcher calls (torchrun, the DeepSpeed launcher,
SLURM, Ray Train). It imports no Ray.

Per process: build the model from the run config, wrap it with `deepspeed.initialize` (config from
`stages/train/parallelize.py`; no op compiled at run time on CPU, a bounded wait on a build lock
elsewhere: `stages/train/ops.py`), stream this rank's shards, and run optimizer steps of v-prediction loss
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
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from configs import RunConfig, dump_config
from configs.validate import check_sequence_parallel
from models.text import T5TextEncoder
from stages.artifacts import export_weights, step_dir
from stages.atomic import remove_leftovers
from stages.folder_lock import FolderInUse, folder_lock
from stages.precision import torch_dtype
from stages.train import checkpoint, elastic
from stages.train.batches import (
    check_shard_geometry,
    draw_guidance,
    draw_noise,
    encode_frozen,
    fit_batch,
    sr_pair,
)
from stages.train.distill import load_teacher
from stages.train.distributed import init_distributed
from stages.train.ops import prepare_builds
from stages.train.parallelize import deepspeed_config, lr_factor, restore_torch_linear
from stages.train.plan import format_training_plan, training_plan
from stages.train.sequence_parallel import Layout, SequenceGroup
from stages.train.sync import StepRecord, grad_norm_bad, nonfinite, read_means, settled_at_once
from stages.train.trainer import DiffusionTrainer, Ema, full_state, local_tensor
from stages.train.watchdog import StepWatchdog

if TYPE_CHECKING:  # both load what `import stages.train` goes without (webdataset, TensorBoard)
    from stages.shards.loader import Batch
    from stages.train.metrics import TrainMetrics


@dataclass
class TrainResult:
    """What one process's `train` call did."""

    step: int
    """Optimizer steps done (including skipped ones)."""
    losses: list[float] = field(default_factory=list)
    """Mean loss of each step this process ran (this rank's micro-batches), NaN for skipped steps."""
    skipped: int = 0
    """Steps skipped by this call: a non-finite loss or gradient norm."""
    checkpoint: Path | None = None
    """The last committed checkpoint."""
    preempted: bool = False
    """A SIGTERM stopped the run early, after a checkpoint of the step it had reached."""


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
    train_cfg = cfg.train
    run = TrainingRun(cfg, fault)
    with run.holding_out_dir(), run.stop_on_sigterm():
        run.start(resume)
        run.open_metrics(progress)
        try:
            with run.watching_peers() as progressed:
                while run.step < train_cfg.steps and not run.stop_requested:
                    run.optimizer_step()
                    if train_cfg.preview_every and run.step % train_cfg.preview_every == 0:
                        run.previews()
                    if run.step % train_cfg.checkpoint_every == 0 or run.step == train_cfg.steps:
                        run.save()
                    progressed(run.step)
                run.settle_pending()  # a step a SIGTERM left pending
                if run.stop_requested:
                    run.save_on_preemption()
        finally:
            run.metrics.close()
        return run.finish()


class TrainingRun:
    """One process's training run: the DeepSpeed engine, the EMA, the batch stream, the training
    generator, the metrics and the result, and the step still waiting for its gradient-norm verdict
    (`pending`, settled one step late as `stages/train/sync.py` describes)."""

    batches: Iterator[Batch]
    """This rank's loader batches, from the start (or resumed) position on; set by `start`."""
    metrics: TrainMetrics
    """Progress bar, metrics.jsonl and TensorBoard; set by `open_metrics`."""

    def __init__(self, cfg: RunConfig, fault: Callable[[int], bool] | None) -> None:
        """Join the launcher's world and build the engine (identical initial weights on every rank), the
        frozen text encoder, the EMA, this rank's loader and the training generator."""
        import deepspeed

        from stages.shards.loader import loader_from_config

        self.cfg, self.fault = cfg, fault
        self.train_cfg = train_cfg = cfg.train
        self.rank, self.world, local = init_distributed(cfg.parallel.collective_timeout_s)
        check_sequence_parallel(cfg, self.world)  # before any compute: the dims name world, N, T', S
        self.layout = Layout(self.rank, self.world, cfg.parallel.sequence_parallel)
        """Data-parallel × sequence-parallel: loader, generator and sample counts go by the dp rank."""
        on_main = threading.current_thread() is threading.main_thread()
        timeout = cfg.parallel.collective_timeout_s
        self.watchdog = StepWatchdog.from_env(self.rank, self.world, timeout) if on_main else None
        """Beats from here on; `watching_peers` arms it (`stages/train/watchdog.py`)."""
        self.device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        self.out = Path(train_cfg.out_dir)
        self.zero3 = cfg.parallel.zero_stage == 3
        self.dtype = torch_dtype(cfg.parallel.precision)

        torch.manual_seed(train_cfg.seed)  # identical initial weights on every rank
        np.random.seed(train_cfg.seed)
        random.seed(train_cfg.seed)
        if not self.zero3:
            restore_torch_linear()
        teacher = load_teacher(cfg) if cfg.distill.teacher else None
        self.module = DiffusionTrainer(cfg, SequenceGroup.create(self.layout), teacher)
        self.trainable = [param for param in self.module.parameters() if param.requires_grad]
        ds_config = deepspeed_config(cfg, self.world)  # DeepSpeed's data-parallel group: all dp × sp ranks
        prepare_builds(ds_config)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.module,
            model_parameters=self.trainable,
            config=ds_config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda at: lr_factor(at, train_cfg.warmup_steps, train_cfg.steps)
            ),
            dist_init_required=False,
        )
        self.frozen_text = (
            T5TextEncoder.from_config(cfg.text).to(self.device) if cfg.text.encoder == "t5" else None
        )
        if teacher is not None:
            teacher.to(self.device, self.dtype)
        wrapped = [param for param in self.engine.module.parameters() if param.requires_grad]
        self.ema = Ema(wrapped, train_cfg.ema_decay)
        self.loader = loader_from_config(cfg, self.layout.dp_rank, self.layout.dp)
        self.gen = torch.Generator().manual_seed(train_cfg.seed * 1_000_003 + self.layout.dp_rank)
        """The training generator: crops, diffusion times, noise, text dropout and SR augmentation (the
        same in every rank of a sequence group, as their batches are)."""
        self.plan = training_plan(cfg, self.world)
        self.config_yaml = dump_config(cfg)

        self.step = 0
        """Optimizer steps done: the number (1-based) of the last step."""
        self.result = TrainResult(step=0)
        self.step_losses: list[float | Tensor] = []
        """`result.losses` as they come: a kept step's micro-batch losses stay tensors until a log line."""
        self.bad_in_a_row = 0
        self.pending: StepRecord | None = None
        """The last step, while its gradient-norm verdict is still on the device."""
        self.preview_clips: Batch | None = None
        """The run's first batch: what super-resolution previews upsample."""
        self.sigterm = False
        """This process got a SIGTERM. The ranks stop together (`stop_requested`): a rank that stopped on
        its own signal while another, signalled a moment later, began one more step would deadlock both."""
        self.stop_requested = False
        """Some rank got a SIGTERM by this step's loss check: every rank finishes the same step, checkpoints
        and returns."""

    # ---- around the steps --------------------------------------------------------------------------

    def start(self, resume: str) -> None:
        """Refuse shards of another geometry (`check_shard_geometry`); continue from the checkpoint `resume`
        names (see `train`), if any; print the training plan."""
        check_shard_geometry(self.cfg)
        start = checkpoint.resolve_resume(self.out, resume)
        resuming = ""
        if start is not None:
            self.step, state = checkpoint.load(self.engine, start, self.rank, self.world, self.layout.sp)
            resuming = f"\nresuming from {start} (step {self.step})"
            if "resized_from" in state:
                resuming += "\n" + self._continue_resized(start, state)
            else:
                checkpoint.set_rng_state(state["rng"], self.gen)
                self.loader.load_state_dict(state["loader"])
                self.ema.load(state["ema"])
        self.result = TrainResult(step=self.step, checkpoint=start)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            print(format_training_plan(self.plan) + resuming, flush=True)
        self.batches = iter(self.loader)

    def _continue_resized(self, start: Path, state: dict) -> str:
        """Take up a checkpoint of another world size (`stages/train/elastic.py`): the loader re-mapped,
        this rank's EMA cut from the saved ones, a fresh training generator; returns the plan's note."""
        self.loader.load_resized_state(state["loaders"])
        ema = elastic.ema_for_rank(state["emas"], state["zero3"], self.ema.params, self.rank, self.world)
        self.ema.load(ema)
        self.gen.manual_seed(elastic.generator_seed(self.train_cfg.seed, self.step, self.layout.dp_rank))
        return elastic.resize_note(
            start,
            (state["resized_from"], state["sequence_from"]),
            (self.world, self.layout.sp),
            self.cfg.parallel.zero_stage,
            self.cfg.data.batch_size * self.cfg.parallel.grad_accum,
        )

    @contextmanager
    def holding_out_dir(self) -> Iterator[None]:
        """While open, rank 0 holds train.out_dir's folder lock (`stages.folder_lock`). When another job
        holds it (FolderInUse) or it is a file (ValueError), every rank raises that, before anything is
        written."""
        with ExitStack() as stack:
            refusal: tuple[type[Exception], str] | None = None
            if self.rank == 0:
                try:
                    stack.enter_context(folder_lock(self.out, "train"))
                except (FolderInUse, ValueError) as err:
                    refusal = (type(err), str(err))
            if self.world > 1:
                verdict = [refusal]
                dist.broadcast_object_list(verdict, src=0)
                refusal = verdict[0]
            if refusal is not None:
                kind, message = refusal
                raise kind(f"train.out_dir: {message}")
            yield

    @contextmanager
    def stop_on_sigterm(self) -> Iterator[None]:
        """While open, SIGTERM sets `sigterm`. Python takes signal handlers only on the main
        thread; a launcher that runs train() on another thread (Ray Train) handles SIGTERM itself, by
        restarting from the last committed checkpoint."""
        on_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, self._request_stop) if on_main else None
        try:
            yield
        finally:
            if on_main:
                signal.signal(signal.SIGTERM, previous)

    @contextmanager
    def watching_peers(self) -> Iterator[Callable[[int], None]]:
        """While open, a step watchdog (`stages/train/watchdog.py`) exits this process, naming the lost
        ranks, when no step finished within parallel.collective_timeout_s or a collective raised; yields
        the call that marks a finished step. Only for a multi-process world this process joined on its
        main thread: Ray Train (a worker thread) owns its process group and restarts lost workers itself.
        A failure before the loop (startup) stops the watchdog's beats with the process."""
        watchdog = self.watchdog
        if watchdog is None:
            yield lambda step: None
            return
        watchdog.progress(self.step)
        try:
            yield watchdog.progress
        except RuntimeError as err:  # gloo and NCCL raise RuntimeErrors (DistBackendError among them)
            watchdog.fail(err)
            raise
        finally:
            watchdog.stop()

    def _request_stop(self, *_: object) -> None:
        self.sigterm = True

    def open_metrics(self, progress: bool) -> None:
        """The progress bar, metrics.jsonl and TensorBoard log, counting from the start step."""
        from stages.train.metrics import TrainMetrics

        self.metrics = TrainMetrics(
            self.out,
            rank=self.rank,
            total_steps=self.train_cfg.steps,
            start_step=self.step,
            log_every=self.train_cfg.log_every,
            progress=progress,
        )

    def finish(self) -> TrainResult:
        """The result, every step's loss read to the host. Rank 0 also removes what a process killed
        mid-write left in train.out_dir: every rank's last checkpoint write is behind a barrier."""
        if self.rank == 0:
            remove_leftovers(self.out)
        read_means(self.step_losses)
        self.result.losses = [float(loss) for loss in self.step_losses]  # all floats already: no device read
        self.result.step = self.step
        return self.result

    # ---- one optimizer step ------------------------------------------------------------------------

    def optimizer_step(self) -> None:
        """One optimizer step of parallel.grad_accum micro-batches, settled now or one step late."""
        record = StepRecord()
        for _ in range(self.cfg.parallel.grad_accum):
            self.micro_batch(record)
        self.step += 1
        record.step, record.lr = self.step, self.scheduler.get_last_lr()[0]
        grad_norm = self.engine.get_global_grad_norm()
        record.grad_norm = grad_norm.detach().clone() if isinstance(grad_norm, Tensor) else grad_norm
        norm_on_device = isinstance(record.grad_norm, Tensor)
        if norm_on_device and not record.bad and not settled_at_once(self.step, self.train_cfg):
            self.pending = record  # settled by the next step's loss check
        else:
            self.settle(record, grad_bad=not record.bad and grad_norm_bad(record.grad_norm))

    def micro_batch(self, record: StepRecord) -> None:
        """The next batch's forward pass, loss check and backward, added to the step in `record`. Once the
        step's loss went non-finite, backward is skipped (no accumulation) or fed an exact zero loss
        (accumulation: DeepSpeed's micro-batch count stays in step)."""
        batch = self._next_batch(record)
        guided = bool(self.cfg.model.guidance_range)  # a guidance-distilled student: always given the text
        dropout = 0.0 if guided else self.train_cfg.text_dropout
        times, noise, drop_text = draw_noise(batch, self.gen, dropout, self.cfg.distill)
        guidance = draw_guidance(batch, self.gen, self.cfg.model.guidance_range) if guided else None
        per_sample = self._per_sample_loss(batch, times, noise, drop_text, guidance)  # (B,)
        loss = per_sample.mean()
        if self.fault is not None and self.fault(self.step):
            loss = loss * float("nan")
        if not record.bad:
            record.bad = self._loss_is_nonfinite(loss)
        if record.bad:
            if self.cfg.parallel.grad_accum == 1:
                return
            loss = sum((param * 0).sum() for param in self.trainable)
        self.engine.backward(loss)
        self.engine.step()
        items = batch.x.shape[0]
        record.losses.append(loss.detach())
        record.times.append(times.reshape(len(per_sample), -1).mean(1))  # (B, T) of packed images → (B,)
        record.sample_losses.append(per_sample.detach())
        record.samples += items * self.layout.dp
        record.tokens += self.plan["tokens_per_sample"] * items * self.layout.dp

    def _next_batch(self, record: StepRecord) -> Batch:
        """The next loader batch at the training geometry; the time spent waiting for it goes to `record`."""
        tick = time.perf_counter()
        batch = fit_batch(next(self.batches), self.cfg, self.gen)
        record.wait += time.perf_counter() - tick
        if self.preview_clips is None:
            self.preview_clips = batch
        return batch

    def _per_sample_loss(
        self, batch: Batch, times: Tensor, noise: Tensor, drop_text: Tensor, guidance: Tensor | None
    ) -> Tensor:
        """The engine's per-sample loss (B,) of a batch: of its super-resolution pair for SR models, with
        frozen text embeddings when the batch stores none (and a guidance-distilled student's weights)."""
        x0, cond, cond_aug = batch.x, None, None
        if self.cfg.model.kind != "base":
            x0, cond, cond_aug = sr_pair(x0, self.cfg, self.module.schedule, self.gen)
        text, text_mask = batch.text, batch.text_mask
        if text is None and self.frozen_text is not None:
            text, text_mask = encode_frozen(self.frozen_text, batch)
        device, dtype = self.device, self.dtype
        return self.engine(
            x0.to(device, dtype),
            times.to(device),
            noise.to(device, dtype),
            captions=batch.flat_captions(),
            text=None if text is None else text.to(device, dtype),
            text_mask=None if text_mask is None else text_mask.to(device),
            fps=batch.fps.to(device),
            drop_text=drop_text.to(device),
            segments=None if batch.segments is None else batch.segments.to(device),
            cond=None if cond is None else cond.to(device, dtype),
            cond_aug=None if cond_aug is None else cond_aug.to(device),
            guidance=None if guidance is None else guidance.to(device),
        )

    def _loss_is_nonfinite(self, loss: Tensor) -> bool:
        """Whether `loss` is non-finite on some rank: the micro-batch's one wait for the device, which
        also brings the pending step's gradient-norm verdict and settles it, and whether some rank got a
        SIGTERM (a NaN flag), which sets `stop_requested` on every rank at the same step."""
        signalled = torch.tensor(float("nan") if self.sigterm else 0.0)
        if self.pending is None:
            loss_bad, stop = nonfinite([loss, signalled])
        else:
            loss_bad, grad_bad, stop = nonfinite([loss, self.pending.grad_norm, signalled])
            self.settle(self.pending, grad_bad=grad_bad)
            self.pending = None
        self.stop_requested = self.stop_requested or stop
        return loss_bad

    def settle(self, record: StepRecord, grad_bad: bool) -> None:
        """Settle a step: skip accounting (and the train.max_bad_steps stop) or the EMA update, then its
        metrics. `grad_bad`: DeepSpeed skipped the step (fp16 overflow) or its gradient blew up."""
        bad = record.bad or grad_bad
        if bad:
            self.result.skipped += 1
            self.bad_in_a_row += 1
            self.step_losses.append(float("nan"))
            if self.bad_in_a_row >= self.train_cfg.max_bad_steps:
                raise NonFiniteError(
                    f"{self.bad_in_a_row} non-finite steps in a row "
                    f"(train.max_bad_steps = {self.train_cfg.max_bad_steps}); "
                    f"stopping without saving; last committed checkpoint: {self.result.checkpoint}"
                )
        else:
            self.bad_in_a_row = 0
            self.ema.update()
            self.step_losses.append(torch.stack(record.losses))
        self.metrics.step(
            record.step - 1,  # the metrics log counts steps from 0
            loss=self.step_losses[-1],
            samples=record.samples,
            tokens=record.tokens,
            lr=record.lr,
            grad_norm=record.grad_norm,
            skipped=bad,
            timestep_losses=record.timestep_losses(),
            data_wait_s=record.wait,
        )
        if bad or record.step % self.train_cfg.log_every == 0 or record.step >= self.train_cfg.steps:
            read_means(self.step_losses)  # the log boundary: this process's losses come to the host too

    def settle_pending(self) -> None:
        """Settle the step still pending when the loop stopped (a SIGTERM before the next step's sync)."""
        if self.pending is not None:
            self.settle(self.pending, grad_bad=grad_norm_bad(self.pending.grad_norm))
            self.pending = None

    # ---- what steps write --------------------------------------------------------------------------

    def previews(self) -> None:
        """Previews of the EMA weights at this step (`stages/train/previews.py`), written by rank 0."""
        from stages.train.previews import write_previews

        state = self._ema_state()  # collective under ZeRO-3
        if self.rank == 0:
            write_previews(state, self.cfg, self.step, self.frozen_text, self.device, self.preview_clips)

    def save(self) -> None:
        """Commit a checkpoint of this step (refused when the weights are not finite on some rank)."""
        finite = all(bool(torch.isfinite(local_tensor(param)).all()) for param in self.trainable)
        if nonfinite([torch.tensor(0.0 if finite else float("nan"))])[0]:
            raise NonFiniteError(f"step {self.step}: the weights are not finite; not saving a checkpoint")
        states = {"model": full_state(self.engine.module, self.zero3), "ema": self._ema_state()}
        rank_state = {
            "rng": checkpoint.rng_state(self.gen),
            "loader": self.loader.state_dict(),
            "ema": self.ema.state(),
        }
        meta = {
            "world_size": self.world,
            "sequence_parallel": self.layout.sp,
            "zero_stage": self.cfg.parallel.zero_stage,
            "precision": self.cfg.parallel.precision,
        }
        self.result.checkpoint = checkpoint.save(
            self.engine,
            self.out,
            self.step,
            self.rank,
            rank_state,
            meta,
            self.config_yaml,
            self.train_cfg.keep_checkpoints,
            exports=lambda directory: export_weights(directory, self.cfg, states),
        )

    def save_on_preemption(self) -> None:
        """After a SIGTERM: checkpoint the step reached unless it is already committed; mark the result."""
        committed = self.result.checkpoint
        if committed is None or committed.name != step_dir(self.out, self.step).name:
            self.save()
        self.result.preempted = True

    def _ema_state(self) -> dict[str, Tensor] | None:
        """The full state dict with the EMA weights in place (a collective under ZeRO-3)."""
        with self.ema.applied():
            return full_state(self.engine.module, self.zero3)
