"""Training observability: a progress bar, a JSONL metrics log and TensorBoard scalars from one object.

The training loop calls `TrainMetrics.step` once per optimizer step on every rank; only rank 0 writes
anything, so the other ranks can make the same calls for free. Steps are numbered from 0: a run does
steps `start_step .. total_steps - 1`, and `start_step` is also how many steps a resumed run already has.

A step's loss, gradient norm and per-sample losses may be passed as tensors still on the device: they
are kept as they are and read (one transfer for the whole window) only when a line is written, so
`step` never waits for the device in between. The progress bar's loss therefore moves at each line.

Every `log_every` steps (counting `step + 1`), on every skipped step and on the last step, one line
goes to `out_dir/metrics.jsonl` and the same values go to TensorBoard (`out_dir/tensorboard`):

- `loss`, `grad_norm`: means over the non-skipped steps since the previous line; `lr`: the latest;
- `steps_per_s`, `samples_per_s`, `tokens_per_s`: wall-clock throughput between `step` calls over the
  window (the very first call has no rate, so a window of only that call writes null); `samples` and
  `tokens` are global counts, so these are whole-job rates. Skipped steps count here: they did the work;
- `data_wait_frac`: time spent waiting for data over step time, in the window;
- `skipped_total`: skipped (non-finite) steps so far in this process; `memory`: peak CUDA memory
  allocated in GiB, or the process RSS in GiB without CUDA; `time`: unix seconds;
- `loss_t{i}`: the mean per-sample loss of samples whose diffusion time t fell in bucket i of
  `timestep_buckets` equal slices of [0, 1] (empty buckets are left out).

A resumed run appends to the same log after dropping lines with `step >= start_step` left by the run
it resumes (and any torn last line), and asks TensorBoard to purge its events from that step on, so
neither sink shows a step twice. Values that are not finite are written as null.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import psutil
import torch
from torch import Tensor
from tqdm import tqdm

from stages.atomic import write_text

METRICS_FILE = "metrics.jsonl"
"""The JSONL log's name inside `out_dir`."""
TENSORBOARD_DIR = "tensorboard"
"""TensorBoard's event-file folder inside `out_dir`."""
SMOOTHING = 0.9
"""Weight of the previous value in the progress bar's moving averages (loss and rates)."""

# Window-line key → TensorBoard tag; other keys (`loss_t{i}`) go under `train/`; `step` and `time` are not
# scalars.
_TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "skipped_total": "train/skipped_steps",
    "steps_per_s": "perf/steps_per_s",
    "samples_per_s": "perf/samples_per_s",
    "tokens_per_s": "perf/tokens_per_s",
    "memory": "perf/memory_gib",
    "data_wait_frac": "perf/data_wait_frac",
}


Value = float | Tensor
"""A per-step number as the training loop has it: a float, or a tensor (possibly still on the device)."""


@dataclass
class _Pending:
    """A non-skipped step's values as `step` got them, read when the window's line is written."""

    loss: Value
    grad_norm: Value | None
    timestep_losses: tuple[Tensor, Tensor] | None


@dataclass
class _Window:
    """Sums over the steps since the last JSONL line (the per-step values join them when it is written)."""

    buckets: int
    pending: list[_Pending] = field(default_factory=list)
    loss_sum: float = 0.0
    loss_n: int = 0
    grad_sum: float = 0.0
    grad_n: int = 0
    timed_steps: int = 0
    seconds: float = 0.0
    samples: int = 0
    tokens: int = 0
    data_wait_s: float = 0.0
    bucket_sum: list[float] = field(default_factory=list)
    bucket_n: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bucket_sum = [0.0] * self.buckets
        self.bucket_n = [0] * self.buckets


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _ema(prev: float | None, x: float) -> float:
    return x if prev is None else SMOOTHING * prev + (1.0 - SMOOTHING) * x


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def read_values(values: list[Value]) -> list[list[float]]:
    """Each value as a flat list of Python floats (a float as a list of one). Tensors on a device come to
    the host in one transfer per device, so reading a whole window waits for the device once.

    Values are exact: float32 and bfloat16 widen to float64 without rounding, so the floats equal those
    `Tensor.item()` / `tolist()` would give one by one."""
    out: list[list[float]] = [[] for _ in values]
    on_device: dict[torch.device, list[int]] = {}
    for i, value in enumerate(values):
        if not isinstance(value, Tensor):
            out[i] = [float(value)]
        elif value.device.type == "cpu":
            out[i] = value.detach().reshape(-1).double().tolist()
        else:
            on_device.setdefault(value.device, []).append(i)
    for indices in on_device.values():
        flat = torch.cat([values[i].detach().reshape(-1).double() for i in indices]).tolist()
        start = 0
        for i in indices:
            count = values[i].numel()
            out[i] = flat[start : start + count]
            start += count
    return out


def _memory_gib() -> float:
    """Peak CUDA memory allocated by this process, or its resident set size without CUDA, in GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


def _step_of(raw: str) -> float:
    """The `step` of one JSONL line; infinity for a line that does not parse (a torn write)."""
    try:
        return json.loads(raw)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _drop_stale_lines(path: Path, start_step: int) -> None:
    """Atomically rewrite `path` without lines for steps >= start_step (or that do not parse)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [raw for raw in lines if _step_of(raw) < start_step]
    if len(kept) == len(lines):
        return
    write_text(path, "".join(line + "\n" for line in kept))


class TrainMetrics:
    """Progress bar, JSONL log and TensorBoard scalars for one training run (see the module docstring).

    Usable as a context manager; `close` is idempotent. On ranks other than 0 every method is a no-op.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        rank: int,
        total_steps: int,
        start_step: int = 0,
        log_every: int = 10,
        tensorboard: bool = True,
        progress: bool = True,
        timestep_buckets: int = 4,
    ) -> None:
        if log_every < 1 or timestep_buckets < 1:
            raise ValueError(f"log_every={log_every} and timestep_buckets={timestep_buckets} must be >= 1")
        self._closed = rank != 0  # other ranks start closed: every method returns at once
        if self._closed:
            return
        self._total_steps = total_steps
        self._log_every = log_every
        self._window = _Window(timestep_buckets)
        self._skipped_total = 0
        self._last_time: float | None = None
        self._smooth: dict[str, float | None] = {"loss": None, "dt": None, "samples": None, "tokens": None}

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / METRICS_FILE
        _drop_stale_lines(path, start_step)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import, only where it is used

            purge = start_step if start_step > 0 else None
            self._writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR), purge_step=purge)
        self._bar = tqdm(initial=start_step, total=total_steps, unit="step", disable=not progress)

    # ---- per-step -------------------------------------------------------------------------------

    def step(
        self,
        step: int,
        *,
        loss: Value,
        samples: int,
        tokens: int,
        lr: float,
        grad_norm: Value | None,
        skipped: bool,
        timestep_losses: tuple[Tensor, Tensor] | None = None,
        data_wait_s: float = 0.0,
    ) -> None:
        """Record optimizer step `step` (0-based); `samples`/`tokens` are global counts for this step.

        `skipped` marks a step whose loss or gradients were not finite and that left the optimizer
        untouched: it counts in `skipped_total` but not in the loss, grad-norm or bucket means.
        `loss` is the step's loss, or a tensor of its micro-batch losses (their mean, taken in float64
        like `np.mean`, is the step's loss). `timestep_losses` is two equal-length 1-D tensors: each
        sample's diffusion time t in [0, 1] and its loss. Tensors may stay on the device: they are read
        when the window's line is written (see the module docstring).
        """
        if self._closed:
            return
        now = time.perf_counter()
        w = self._window
        if self._last_time is not None:
            dt = now - self._last_time
            w.timed_steps += 1
            w.seconds += dt
            w.samples += samples
            w.tokens += tokens
            w.data_wait_s += data_wait_s
            self._smooth["dt"] = _ema(self._smooth["dt"], dt)
            self._smooth["samples"] = _ema(self._smooth["samples"], samples)
            self._smooth["tokens"] = _ema(self._smooth["tokens"], tokens)
        self._last_time = now

        if skipped:
            self._skipped_total += 1
        else:
            w.pending.append(_Pending(loss, grad_norm, timestep_losses))

        line = None
        if skipped or (step + 1) % self._log_every == 0 or step + 1 >= self._total_steps:
            line = self._window_line(step, lr)  # reads the window's tensors: the only wait for the device
        self._update_bar()
        if line is not None:
            self._emit(step, line)
            self._window = _Window(w.buckets)

    def log(self, step: int, **scalars: float) -> None:
        """Write extra scalars (e.g. eval losses) for `step`: keys are JSONL keys and TensorBoard tags."""
        if self._closed:
            return
        self._emit(step, {"step": step, **{k: float(v) for k, v in scalars.items()}}, train=False)

    # ---- sinks ----------------------------------------------------------------------------------

    def _read_pending(self) -> None:
        """Fold the window's per-step values into its sums (and the bar's smoothed loss), in step order,
        after reading them from the device in one go."""
        w = self._window
        values: list[Value] = []
        for p in w.pending:
            values.append(p.loss)
            if p.grad_norm is not None:
                values.append(p.grad_norm)
            if p.timestep_losses is not None:
                values.extend(p.timestep_losses)
        host = iter(read_values(values))
        for p in w.pending:
            loss = float(np.mean(next(host)))
            w.loss_sum += loss
            w.loss_n += 1
            self._smooth["loss"] = _ema(self._smooth["loss"], loss)
            if p.grad_norm is not None:
                (grad_norm,) = next(host)
                w.grad_sum += grad_norm
                w.grad_n += 1
            if p.timestep_losses is None:
                continue
            for t, sample_loss in zip(next(host), next(host), strict=True):
                i = min(max(int(t * w.buckets), 0), w.buckets - 1)
                w.bucket_sum[i] += sample_loss
                w.bucket_n[i] += 1
        w.pending = []

    def _window_line(self, step: int, lr: float) -> dict[str, Any]:
        self._read_pending()
        w = self._window
        line: dict[str, Any] = {
            "step": step,
            "loss": _ratio(w.loss_sum, w.loss_n),
            "lr": float(lr),
            "grad_norm": _ratio(w.grad_sum, w.grad_n),
            "steps_per_s": _ratio(w.timed_steps, w.seconds),
            "samples_per_s": _ratio(w.samples, w.seconds),
            "tokens_per_s": _ratio(w.tokens, w.seconds),
            "skipped_total": self._skipped_total,
            "data_wait_frac": _ratio(w.data_wait_s, w.seconds),
            "memory": _memory_gib(),
            "time": time.time(),
        }
        for i, (total, n) in enumerate(zip(w.bucket_sum, w.bucket_n)):
            if n:
                line[f"loss_t{i}"] = total / n
        return line

    def _emit(self, step: int, line: dict[str, Any], train: bool = True) -> None:
        """Append `line` to the JSONL log and its scalars to TensorBoard: a window line's under the
        `train/` and `perf/` tags, a `log` call's under their own keys."""
        line = {k: v if isinstance(v, int) else _finite(v) for k, v in line.items()}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self._writer is None:
            return
        for key, value in line.items():
            if key in ("step", "time") or value is None:
                continue
            tag = _TAGS.get(key, f"train/{key}") if train else key
            self._writer.add_scalar(tag, value, step)

    def _update_bar(self) -> None:
        s = self._smooth
        postfix: dict[str, str] = {}
        if s["loss"] is not None:
            postfix["loss"] = f"{s['loss']:.4f}"
        if s["dt"]:
            postfix["steps/s"] = f"{1.0 / s['dt']:.2f}"
            postfix["samples/s"] = f"{s['samples'] / s['dt']:.1f}"
            postfix["tokens/s"] = f"{s['tokens'] / s['dt']:.3g}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    # ---- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close the log, the TensorBoard writer and the progress bar; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._bar.close()
        if self._writer is not None:
            self._writer.close()
        self._file.close()

    def __enter__(self) -> TrainMetrics:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
