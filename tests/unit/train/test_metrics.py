"""TrainMetrics: JSONL cadence and window means, duplicate-free resume, rank-0-only writes, TensorBoard."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from stages.train import metrics
from stages.train.metrics import METRICS_FILE, TENSORBOARD_DIR, TrainMetrics


def _lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


def _step(m: TrainMetrics, step: int, loss: float = 1.0, **kw) -> None:
    args = {"samples": 4, "tokens": 400, "lr": 1e-4, "grad_norm": 0.5, "skipped": False} | kw
    m.step(step, loss=loss, **args)


def _pairs(pairs: list[tuple[float, float]] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(t, per-sample loss) pairs as the loop passes them: a tensor of times and one of losses."""
    if pairs is None:
        return None
    times, losses = zip(*pairs, strict=True)
    return torch.tensor(times, dtype=torch.float64), torch.tensor(losses, dtype=torch.float64)


def _fake_clock(monkeypatch, times: list[float]) -> None:
    ticks = iter(times)
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(ticks))


def _scalars(out, tag: str | None) -> dict[int, float] | list[str]:
    """TensorBoard's scalar `tag` as {step: value}, read back from the event files; all tags if None."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / TENSORBOARD_DIR))
    acc.Reload()
    if tag is None:
        return acc.Tags()["scalars"]
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_lines_on_cadence_skips_and_last_step_with_window_means(tmp_path):
    losses = [1.0, 2.0, 3.0, 4.0, math.nan, 6.0, 7.0, 8.0]
    grads = [0.1, 0.2, 0.3, 0.4, math.inf, 0.6, 0.7, 0.8]
    buckets = {
        0: [(0.1, 1.0), (0.6, 3.0)],
        1: [(0.2, 2.0), (1.0, 5.0)],  # t = 1 belongs to the last bucket
        2: [(0.0, 4.0)],
        4: [(0.3, 100.0)],  # skipped step: must not enter any mean
        6: [(0.3, 9.0), (0.4, 11.0)],
    }
    with TrainMetrics(tmp_path, rank=0, total_steps=8, log_every=3, tensorboard=False, progress=False) as m:
        for s in range(8):
            t_losses = _pairs(buckets.get(s))
            _step(m, s, losses[s], grad_norm=grads[s], lr=0.1 * s, skipped=s == 4, timestep_losses=t_losses)
    lines = _lines(tmp_path)
    assert [ln["step"] for ln in lines] == [2, 4, 5, 7]  # (step+1) % 3 == 0, the skipped step, the last
    assert [ln["loss"] for ln in lines] == pytest.approx([2.0, 4.0, 6.0, 7.5])
    assert [ln["grad_norm"] for ln in lines] == pytest.approx([0.2, 0.4, 0.6, 0.75])
    assert [ln["lr"] for ln in lines] == pytest.approx([0.2, 0.4, 0.5, 0.7])
    assert [ln["skipped_total"] for ln in lines] == [0, 1, 1, 1]

    first = lines[0]
    assert first["loss_t0"] == pytest.approx(7.0 / 3) and "loss_t1" not in first
    assert first["loss_t2"] == pytest.approx(3.0) and first["loss_t3"] == pytest.approx(5.0)
    assert not any(k.startswith("loss_t") for k in lines[1])  # only the skipped step's samples
    assert lines[3]["loss_t1"] == pytest.approx(10.0) and "loss_t0" not in lines[3]
    for ln in lines:
        assert ln["memory"] > 0 and abs(ln["time"] - time.time()) < 60
        assert {"steps_per_s", "samples_per_s", "tokens_per_s", "data_wait_frac"} <= ln.keys()


def test_tensor_values_are_read_at_the_line_and_give_the_float_values(monkeypatch, tmp_path):
    """The loop passes each step's micro-batch losses, gradient norm and per-sample losses as tensors
    (on a GPU: still on the device). They give exactly the lines floats give, and are read only when a
    line is written: a tensor filled in after its `step` call but before the line shows its new values."""
    import numpy as np

    steps = [  # (micro-batch losses, grad norm, times, per-sample losses, skipped)
        ([0.3, 0.7], 0.25, [0.1, 0.6, 0.9], [1.0, 2.0, 3.0], False),
        ([1.5, 0.2], 0.5, [0.3, 0.35, 1.0], [4.0, 5.5, 6.0], False),
        ([math.nan, 1.0], math.inf, [0.2, 0.4, 0.8], [7.0, 8.0, 9.0], True),
        ([2.0, 3.1], 0.75, [0.05, 0.5, 0.7], [0.1, 0.2, 0.3], False),
    ]
    logs = {}
    for kind in ("float", "tensor"):
        out = tmp_path / kind
        _fake_clock(monkeypatch, [10.0, 11.0, 13.0, 14.0])
        with TrainMetrics(out, rank=0, total_steps=4, log_every=2, tensorboard=False, progress=False) as m:
            for s, (micro, grad, times, sample_losses, skipped) in enumerate(steps):
                if kind == "float":
                    loss, norm, pairs = float(np.mean(micro)), grad, _pairs(list(zip(times, sample_losses)))
                else:
                    f64 = {"dtype": torch.float64}
                    loss = torch.zeros(2, **f64) if s == 0 else torch.tensor(micro, **f64)
                    norm = torch.tensor(grad, **f64)
                    pairs = (torch.tensor(times, **f64), torch.tensor(sample_losses, **f64))
                _step(m, s, loss, grad_norm=norm, skipped=skipped, timestep_losses=pairs)
                if kind == "tensor" and s == 0:
                    loss.copy_(torch.tensor(micro, **f64))  # before step 1 writes the line
        logs[kind] = [{k: v for k, v in ln.items() if k not in ("time", "memory")} for ln in _lines(out)]
    assert [ln["step"] for ln in logs["float"]] == [1, 2, 3]
    assert logs["float"][0]["loss"] == (float(np.mean([0.3, 0.7])) + float(np.mean([1.5, 0.2]))) / 2
    assert logs["tensor"] == logs["float"]


def test_rates_are_global_wall_clock_over_the_window(monkeypatch, tmp_path):
    _fake_clock(monkeypatch, [10.0, 11.0, 13.0, 14.0])
    with TrainMetrics(tmp_path, rank=0, total_steps=4, log_every=3, tensorboard=False, progress=False) as m:
        for s in range(4):
            _step(m, s, samples=8, tokens=800, data_wait_s=0.5)
    first, last = _lines(tmp_path)
    # The first call has no previous call to time against: the window is steps 1-2, 3 seconds.
    assert first["steps_per_s"] == pytest.approx(2 / 3)
    assert first["samples_per_s"] == pytest.approx(16 / 3)
    assert first["tokens_per_s"] == pytest.approx(1600 / 3)
    assert first["data_wait_frac"] == pytest.approx(1.0 / 3)
    assert last["steps_per_s"] == pytest.approx(1.0) and last["data_wait_frac"] == pytest.approx(0.5)


def test_first_step_alone_has_no_rate(tmp_path):
    with TrainMetrics(tmp_path, rank=0, total_steps=5, log_every=1, tensorboard=False, progress=False) as m:
        _step(m, 0)
    (line,) = _lines(tmp_path)
    assert line["steps_per_s"] is None and line["samples_per_s"] is None and line["data_wait_frac"] is None


def test_throughput_positive_in_real_time(tmp_path):
    with TrainMetrics(tmp_path, rank=0, total_steps=3, log_every=3, tensorboard=False, progress=False) as m:
        for s in range(3):
            time.sleep(0.01)
            _step(m, s, data_wait_s=0.001)
    (line,) = _lines(tmp_path)
    for key in ("steps_per_s", "samples_per_s", "tokens_per_s", "data_wait_frac"):
        assert line[key] > 0


def test_resume_drops_stale_and_torn_lines_then_appends(tmp_path):
    with TrainMetrics(tmp_path, rank=0, total_steps=10, log_every=2, tensorboard=False, progress=False) as m:
        for s in range(8):  # "crashes" after step 7
            _step(m, s, loss=float(s))
        m.log(5, eval_loss=0.5)
    assert [ln["step"] for ln in _lines(tmp_path)] == [1, 3, 5, 7, 5]
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 8, "lo')  # a torn write

    with TrainMetrics(
        tmp_path, rank=0, total_steps=10, start_step=4, log_every=2, tensorboard=False, progress=False
    ) as m:
        assert [ln["step"] for ln in _lines(tmp_path)] == [1, 3]
        for s in range(4, 10):
            _step(m, s, loss=10.0 + s)
    lines = _lines(tmp_path)
    assert [ln["step"] for ln in lines] == [1, 3, 5, 7, 9]
    assert [ln["loss"] for ln in lines] == pytest.approx([0.5, 2.5, 14.5, 16.5, 18.5])
    assert not (tmp_path / (METRICS_FILE + ".tmp")).exists()


def test_resume_keeps_an_up_to_date_log_untouched(tmp_path):
    with TrainMetrics(tmp_path, rank=0, total_steps=4, log_every=2, tensorboard=False, progress=False) as m:
        for s in range(4):
            _step(m, s)
    before = (tmp_path / METRICS_FILE).read_bytes()
    TrainMetrics(tmp_path, rank=0, total_steps=8, start_step=4, tensorboard=False, progress=False).close()
    assert (tmp_path / METRICS_FILE).read_bytes() == before


def test_other_ranks_write_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    m = TrainMetrics(out, rank=1, total_steps=3, log_every=1)
    for s in range(3):
        _step(m, s, skipped=s == 1, timestep_losses=_pairs([(0.5, 1.0)]))
    m.log(2, eval_loss=1.0)
    m.close()
    m.close()
    assert not out.exists()
    assert capsys.readouterr().err == ""


def test_tensorboard_scalars_match_the_jsonl(tmp_path):
    with TrainMetrics(tmp_path, rank=0, total_steps=4, log_every=2, progress=False) as m:
        for s in range(4):
            _step(m, s, loss=float(s), skipped=s == 2, timestep_losses=_pairs([(0.9, 2.0 * s)]))
        m.log(3, **{"eval/loss": 0.25})
    expected = {
        "train/loss", "train/loss_t3", "train/grad_norm", "train/lr", "train/skipped_steps",
        "perf/steps_per_s", "perf/samples_per_s", "perf/tokens_per_s", "perf/memory_gib",
        "perf/data_wait_frac", "eval/loss",
    }  # fmt: skip
    assert set(_scalars(tmp_path, None)) == expected
    assert _scalars(tmp_path, "train/loss") == pytest.approx({1: 0.5, 3: 3.0})  # skipped step 2: no loss
    assert _scalars(tmp_path, "train/skipped_steps") == {1: 0, 2: 1, 3: 1}
    assert _scalars(tmp_path, "train/loss_t3") == pytest.approx({1: 1.0, 3: 6.0})
    assert _scalars(tmp_path, "eval/loss") == {3: 0.25}


def test_resumed_tensorboard_purges_stale_steps(tmp_path):
    with TrainMetrics(tmp_path, rank=0, total_steps=6, log_every=1, progress=False) as m:
        for s in range(5):
            _step(m, s, loss=float(s))
    # readers order event files by name, which starts with the creation second (then a per-process
    # counter compared as text); a real resumed run starts in a later second, so this one does too
    time.sleep(1.1)
    with TrainMetrics(tmp_path, rank=0, total_steps=6, start_step=3, log_every=1, progress=False) as m:
        for s in range(3, 6):
            _step(m, s, loss=10.0 + s)
    assert _scalars(tmp_path, "train/loss") == pytest.approx({0: 0, 1: 1, 2: 2, 3: 13, 4: 14, 5: 15})
    # The accumulator above would also drop out-of-order steps by itself; the resumed writer's explicit
    # purge marker (SessionLog.START at start_step) is what every TensorBoard reader honours.
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    starts = [
        event.step
        for path in (tmp_path / TENSORBOARD_DIR).iterdir()
        for event in EventFileLoader(str(path)).Load()
        if event.HasField("session_log") and event.session_log.status == SessionLog.START
    ]
    assert starts == [3]


def test_progress_bar_shows_smoothed_loss_and_rates(tmp_path, capsys):
    with TrainMetrics(tmp_path, rank=0, total_steps=3, log_every=10, tensorboard=False) as m:
        for s in range(3):
            time.sleep(0.002)
            _step(m, s, loss=2.0)
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=2.0000" in err
    assert "steps/s=" in err and "samples/s=" in err and "tokens/s=" in err


def test_close_is_idempotent_and_later_calls_are_ignored(tmp_path):
    m = TrainMetrics(tmp_path, rank=0, total_steps=2, log_every=1, progress=False)
    _step(m, 0)
    m.close()
    m.close()
    _step(m, 1)
    m.log(1, eval_loss=1.0)
    assert [ln["step"] for ln in _lines(tmp_path)] == [0]


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="log_every=0"):
        TrainMetrics(tmp_path, rank=0, total_steps=2, log_every=0)
