"""Cascade rendering on two engines: the hand-written scheduler over Ray actor pools (`stages.render.render`
with `pipeline.ray_render.ray_executor`) against a Ray Data prototype (`ray.data` streaming execution, one
`map_batches` actor pool per stage); prints a table and writes JSON, and probes Ray Data's failure,
ordering, startup and resource behaviour for the engine decision (docs/RENDERING.md).

    python bench/render_engines.py                       # tiny test cascade, 24 prompts, batch 1
    python bench/render_engines.py --prompts 8 --probe kill error order startup resources
    python bench/render_engines.py --cascade configs/cascade/demo.yaml --steps 2 --prompts 4

The Ray Data prototype (`ray_data_render`): `from_items` rows carry only small references (prompt index,
text, the prompt's output folder), one block per prompt; each stage is a `map_batches(StageUDF, concurrency=
replicas[k])` whose actors load the stage's `StageRunner` once, read each prompt's input from the previous
stage's safetensors file, sample, write their own stage file (the same paths as `render`) and return the
small rows. A batch that raises is retried prompt by prompt and a prompt that still raises comes back with
its `error` column set (later stages pass it through) instead of failing the dataset. The last stage also
writes `video.mp4` and a small sidecar, as `render` does (no intermediate media, no contact sheet in either).

Table: wall seconds of the whole render (actor start-up and weight loading included), videos/hour, the
driver's peak RSS during the run (`report.PeakRSS`: psutil, 20 ms samples), the seconds from the call to the
first stage-0 and the first last-stage file (their modification times). Ray Data outputs are compared bit for
bit (`torch.equal`) with the baseline's stage files of the same batch size. Ray is started once in-process
(`pipeline.ray_cluster.ensure_ray`, --cpus CPUs); an untimed one-prompt render on each engine warms it first.
This is a benchmark, never a test.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from report import PeakRSS, print_table, record_header, write_record

from configs import CascadeConfig, RenderConfig, load_cascade
from pipeline.ray_cluster import ensure_ray
from stages.render.output import (
    load_video_tensor,
    prompt_dir,
    save_video_tensor,
    stage_path,
    video_frames,
    write_json,
    write_media,
)
from stages.render.stage import StageItem, StageRunner, StageSpec, prepare_stages

CAPTIONS = ["a red circle moving right", "a blue square moving up", "a green triangle", "waves at dusk"]


# ---------------------------------------------------------------------------------------------------
# The Ray Data prototype
# ---------------------------------------------------------------------------------------------------


def stage_file(folder: str | Path, spec: StageSpec) -> Path:
    return stage_path(Path(folder), spec.index, spec.name, ".safetensors")


class StageUDF:
    """One replica of a stage in a Ray Data actor pool: its `StageRunner`, loaded once.

    `probe_dir` (optional) gets `pid-{stage}-{pid}.json` at start-up and one `calls.jsonl` line per batch
    start and end (the probes find actors and count executions there); `fail` is a prompt index whose
    sampling raises at this stage; `catch=False` lets that error out of the UDF."""

    def __init__(
        self,
        spec: StageSpec,
        prev: StageSpec | None,
        last: bool,
        probe_dir: str = "",
        fail: int = -1,
        catch: bool = True,
    ) -> None:
        self.spec, self.prev, self.last = spec, prev, last
        self.probe_dir, self.fail, self.catch = probe_dir, fail, catch
        self.runner = StageRunner(spec)
        self.pid = os.getpid()
        if probe_dir:
            info = {
                "stage": spec.index,
                "pid": self.pid,
                "torch_threads": torch.get_num_threads(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "time": time.time(),
            }
            (Path(probe_dir) / f"pid-{spec.index}-{self.pid}.json").write_text(json.dumps(info))

    def _log(self, event: str, indices: list[int]) -> None:
        if self.probe_dir:
            line = {"stage": self.spec.index, "event": event, "indices": indices, "pid": self.pid}
            with open(Path(self.probe_dir) / "calls.jsonl", "a") as handle:
                handle.write(json.dumps({**line, "time": time.time()}) + "\n")

    def _sample(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if any(int(r["index"]) == self.fail for r in rows):
            raise RuntimeError(f"injected failure: prompt {self.fail} at stage '{self.spec.name}'")
        items = [
            StageItem(
                int(r["index"]),
                str(r["prompt"]),
                None if self.prev is None else load_video_tensor(stage_file(r["dir"], self.prev)),
            )
            for r in rows
        ]
        start = time.perf_counter()
        videos = self.runner.run(items)
        seconds = time.perf_counter() - start
        for row, video in zip(rows, videos, strict=True):
            meta = {"seconds": seconds / len(rows), "batch_size": len(rows), "engine": "ray.data"}
            save_video_tensor(stage_file(row["dir"], self.spec), video, meta)
            if self.last:
                folder, fps = Path(row["dir"]), self.spec.stage.fps
                output = write_media(video_frames(video), folder / ("video" if fps > 0 else "image"), fps)
                write_json(folder / "video.json", {"prompt": str(row["prompt"]), "output": output.name})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        indices = [int(r["index"]) for r in rows]
        errors = {i: str(r["error"]) for i, r in zip(indices, rows) if r["error"]}
        todo = [r for r in rows if not r["error"]]
        self._log("start", indices)
        try:
            self._sample(todo)
        except Exception:  # isolate: each prompt alone, so one bad prompt fails alone
            if not self.catch:
                raise
            for row in todo:
                try:
                    self._sample([row])
                except Exception as err:
                    errors[int(row["index"])] = f"stage '{self.spec.name}': {type(err).__name__}: {err}"
        self._log("end", indices)
        k = self.spec.index
        out = {key: np.asarray(values) for key, values in batch.items()}
        out["error"] = np.asarray([errors.get(i, "") for i in indices], dtype=object)
        out[f"batch_{k}"] = np.asarray([",".join(map(str, indices))] * len(rows), dtype=object)
        out[f"pid_{k}"] = np.asarray([self.pid] * len(rows))
        return out


def ray_data_render(
    specs: list[StageSpec],
    prompts: list[str],
    out_dir: Path,
    replicas: list[int],
    batch_size: int = 1,
    *,
    num_cpus: float | None = None,
    probe_dir: Path | None = None,
    fail: tuple[int, int] = (-1, -1),
    catch: bool = True,
    preserve_order: bool = False,
    max_errored_blocks: int = 0,
    blocks: int | None = None,
    source: str = "items",
) -> dict[str, Any]:
    """Render `prompts` through `specs` with Ray Data, `replicas[k]` actors at stage k; the rows that came
    back (in arrival order, each with its arrival time), timings, and what the execution raised, if it did.

    `num_cpus` per actor defaults to one, or an equal share of the cluster's CPUs when there are fewer
    (as `pipeline.ray_render.replica_resources`); on a cluster with GPUs each actor asks for a GPU share
    instead. `fail=(stage, index)` injects an error; `blocks` is the source's block count (default one
    block per prompt); `source` "json" reads the rows from a JSONL file (read tasks) instead."""
    import ray
    from ray.data import DataContext

    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0.0)), float(resources.get("CPU", 1.0))
    total = sum(replicas)
    if gpus > 0:
        share = {"num_gpus": min(1.0, gpus / total), "num_cpus": num_cpus or 0.0}
    else:
        share = {"num_cpus": num_cpus if num_cpus is not None else min(1.0, cpus / total)}
    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.max_errored_blocks, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = preserve_order
    ctx.max_errored_blocks = max_errored_blocks
    ctx.enable_progress_bars = False
    if probe_dir is not None:
        probe_dir.mkdir(parents=True, exist_ok=True)
    items = [
        {"index": i, "prompt": p, "dir": str(prompt_dir(out_dir, i, p)), "error": ""}
        for i, p in enumerate(prompts)
    ]
    for item in items:
        (Path(item["dir"]) / "stages").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    raised = ""
    start_wall, start = time.time(), time.perf_counter()
    try:
        if source == "json":  # read tasks (a CPU each by default) instead of from_items' in-memory blocks
            path = Path(out_dir) / "prompts.jsonl"
            path.write_text("".join(json.dumps(item) + "\n" for item in items))
            ds = ray.data.read_json(str(path), override_num_blocks=blocks or len(items))
        else:
            ds = ray.data.from_items(items, override_num_blocks=blocks or len(items))
        for k, spec in enumerate(specs):
            ds = ds.map_batches(
                StageUDF,
                fn_constructor_kwargs={
                    "spec": spec,
                    "prev": specs[k - 1] if k else None,
                    "last": k == len(specs) - 1,
                    "probe_dir": str(probe_dir or ""),
                    "fail": fail[1] if fail[0] == k else -1,
                    "catch": catch,
                },
                concurrency=replicas[k],
                batch_size=batch_size,
                batch_format="numpy",
                **share,
            )
        created = time.perf_counter()  # the pipeline is lazy: nothing has run yet
        for row in ds.iter_rows():
            rows.append({k: v.item() if hasattr(v, "item") else v for k, v in row.items()})
            rows[-1]["arrived_s"] = time.perf_counter() - start
    except Exception as err:  # the probes record what a failed execution raises
        raised = f"{type(err).__name__}: {str(err)[:600]}"
    finally:
        ctx.execution_options.preserve_order, ctx.max_errored_blocks, ctx.enable_progress_bars = saved
    seconds = time.perf_counter() - start
    return {
        "rows": rows,
        "seconds": seconds,
        "start_wall": start_wall,
        "build_s": created - start if rows or not raised else None,
        "first_row_s": rows[0]["arrived_s"] if rows else None,
        "raised": raised,
        "resources": share,
    }


# ---------------------------------------------------------------------------------------------------
# The baseline: the actor-pool scheduler, one replica per stage
# ---------------------------------------------------------------------------------------------------


def probed_runner(probe_dir: str, spec: StageSpec, device: str | None) -> StageRunner:
    """The baseline's runner factory: a `StageRunner` that notes its pid and load time as StageUDF does."""
    runner = StageRunner(spec, device)
    info = {"stage": spec.index, "pid": os.getpid(), "torch_threads": torch.get_num_threads()}
    info["time"] = time.time()
    (Path(probe_dir) / f"pid-{spec.index}-{os.getpid()}.json").write_text(json.dumps(info))
    return runner


def actor_render(
    cascade: CascadeConfig,
    prompts: list[str],
    out_dir: Path,
    batch_size: int = 1,
    probe_dir: Path | None = None,
) -> dict:
    """`stages.render.render` on `pipeline.ray_render.ray_executor()` (one replica per stage), without
    intermediate media or contact sheets; its timings. (Wrapped: that API is changing.)"""
    from pipeline.ray_render import ray_executor
    from stages.render import render

    settings = RenderConfig(
        out_dir=str(out_dir), batch_size=batch_size, save_intermediate=False, contact_sheet=False
    )
    factory = None
    if probe_dir is not None:
        probe_dir.mkdir(parents=True, exist_ok=True)
        factory = functools.partial(probed_runner, str(probe_dir))
    start_wall, start = time.time(), time.perf_counter()
    summary = render(cascade, prompts, settings, executor=ray_executor(runner_factory=factory))
    return {
        "seconds": time.perf_counter() - start,
        "start_wall": start_wall,
        "failures": len(summary.failures),
        "statuses": Counter(p["status"] for p in summary.prompts),
    }


# ---------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------


def file_times(out_dir: Path, prompts: list[str], specs: list[StageSpec], start_wall: float) -> dict:
    """Seconds from `start_wall` to the first stage-0 file and the first last-stage file; how many exist."""

    def times(spec: StageSpec) -> list[float]:
        paths = [stage_file(prompt_dir(out_dir, i, p), spec) for i, p in enumerate(prompts)]
        return [path.stat().st_mtime - start_wall for path in paths if path.is_file()]

    first, last = times(specs[0]), times(specs[-1])
    return {
        "first_base_s": min(first) if first else None,
        "first_video_s": min(last) if last else None,
        "videos": len(last),
    }


def compare(a: Path, b: Path, prompts: list[str], specs: list[StageSpec]) -> dict[str, int]:
    """How many stage files of output folders a and b are bit-identical (torch.equal), differ, are missing."""
    counts = Counter()
    for i, p in enumerate(prompts):
        for spec in specs:
            fa, fb = stage_file(prompt_dir(a, i, p), spec), stage_file(prompt_dir(b, i, p), spec)
            if not (fa.is_file() and fb.is_file()):
                counts["missing"] += 1
            elif torch.equal(load_video_tensor(fa), load_video_tensor(fb)):
                counts["equal"] += 1
            else:
                counts["different"] += 1
    return dict(counts)


def table_row(engine: str, replicas: list[int], prompts: list[str], run: dict, rss: float, out: Path) -> dict:
    """One row of the engine table for the render into `out` (its probe notes in `out/_probe`)."""
    files = file_times(out, prompts, run["specs"], run["start_wall"])
    ready = [p["time"] - run["start_wall"] for p in actor_pids(out / "_probe")]
    return {
        "engine": engine,
        "replicas": str(replicas),
        "prompts": len(prompts),
        "videos": files["videos"],
        "wall_s": round(run["seconds"], 2),
        "videos_per_h": round(3600 * files["videos"] / run["seconds"]),
        "driver_peak_rss_mib": round(rss),
        "actors_loaded_s": round(max(ready), 2) if ready else "-",
        "first_base_s": round(files["first_base_s"], 2) if files["first_base_s"] is not None else "-",
        "first_video_s": round(files["first_video_s"], 2) if files["first_video_s"] is not None else "-",
    }


def read_calls(probe_dir: Path) -> list[dict[str, Any]]:
    path = probe_dir / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def actor_pids(probe_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(probe_dir.glob("pid-*.json"))]


def row_counts(rows: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Whether every prompt came back exactly once: missing and duplicated indices, error rows."""
    seen = Counter(int(r["index"]) for r in rows)
    return {
        "rows": len(rows),
        "missing": sorted(set(range(n)) - set(seen)),
        "duplicated": sorted(i for i, c in seen.items() if c > 1),
        "errors": {int(r["index"]): r["error"] for r in rows if r["error"]},
    }


# ---------------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------------


def probe_kill(specs: list[StageSpec], prompts: list[str], work: Path, stage: int = 1) -> dict:
    """SIGKILL the stage-`stage` actor while it samples a batch (the 4th it starts); what comes back."""
    probe, out = work / "kill-probe", work / "kill-out"
    probe.mkdir(parents=True)
    killed: dict[str, Any] = {}

    def killer() -> None:
        while not killed:
            for call in read_calls(probe):
                if call["stage"] == stage and call["event"] == "start" and min(call["indices"]) >= 3:
                    os.kill(call["pid"], signal.SIGKILL)
                    killed.update(pid=call["pid"], indices=call["indices"], time=time.time())
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    run = ray_data_render(specs, prompts, out, [1, 1, 1], probe_dir=probe)
    killed.setdefault("pid", None)
    thread.join(timeout=1)
    calls = read_calls(probe)
    starts = Counter((c["stage"], i) for c in calls if c["event"] == "start" for i in c["indices"])
    pids = actor_pids(probe)
    restarted = [p for p in pids if p["stage"] == stage and p["pid"] != killed.get("pid")]
    return {
        "killed": killed,
        "raised": run["raised"],
        "seconds": round(run["seconds"], 2),
        **row_counts(run["rows"], len(prompts)),
        "executions_more_than_once": {f"{s}:{i}": c for (s, i), c in starts.items() if c > 1},
        "actors_started": [(p["stage"], p["pid"]) for p in pids],
        "replacement_actor_started_s_after_kill": (
            round(restarted[0]["time"] - killed["time"], 2) if restarted and killed.get("time") else None
        ),
        "videos_on_disk": file_times(out, prompts, specs, run["start_wall"])["videos"],
    }


def probe_error(specs: list[StageSpec], prompts: list[str], work: Path) -> dict:
    """A UDF that raises (no catch) for prompt 5 (or the last) at stage 1: the whole dataset? With
    max_errored_blocks=1? And the catching UDF for contrast."""
    result: dict[str, Any] = {"failing_prompt": (index := min(5, len(prompts) - 1))}
    for name, kwargs in [
        ("raise", {"catch": False}),
        ("raise_max_errored_blocks_1", {"catch": False, "max_errored_blocks": 1}),
        ("catch", {"catch": True}),
    ]:
        out, probe = work / f"error-{name}", work / f"error-{name}-probe"
        run = ray_data_render(specs, prompts, out, [1, 1, 1], probe_dir=probe, fail=(1, index), **kwargs)
        calls = read_calls(probe)
        result[name] = {
            "raised": run["raised"],
            "seconds": round(run["seconds"], 2),
            **row_counts(run["rows"], len(prompts)),
            "batches_started_per_stage": dict(Counter(c["stage"] for c in calls if c["event"] == "start")),
            "videos_on_disk": file_times(out, prompts, specs, run["start_wall"])["videos"],
        }
    return result


def probe_order(
    cascade: CascadeConfig, specs: list[StageSpec], prompts: list[str], work: Path, runs: int = 3
) -> dict:
    """Batch composition per stage and arrival order over `runs` runs at batch 2, [1,1,2]; then with
    preserve_order; outputs compared bitwise between runs and with the baseline at batch 2."""
    result: dict[str, Any] = {}
    outs = []
    for order in (False, True):
        compositions, arrivals, seconds = [], [], []
        for r in range(runs if not order else 2):
            out = work / f"order-{order}-{r}"
            run = ray_data_render(specs, prompts, out, [1, 1, 2], batch_size=2, preserve_order=order)
            outs.append(out)
            comp = {
                k: sorted({row[f"batch_{k}"] for row in run["rows"]}, key=lambda b: int(b.split(",")[0]))
                for k in range(len(specs))
            }
            compositions.append(comp)
            arrivals.append([int(r["index"]) for r in run["rows"]])
            seconds.append(round(run["seconds"], 2))
        result[f"preserve_order={order}"] = {
            "seconds": seconds,
            "same_composition_every_run": all(c == compositions[0] for c in compositions),
            "composition_run0": compositions[0],
            "arrival_orders": arrivals,
        }
    result["outputs_run0_vs_others"] = [compare(outs[0], o, prompts, specs) for o in outs[1:]]
    base = work / "order-baseline-b2"
    result["baseline_b2_seconds"] = round(actor_render(cascade, prompts, base, 2)["seconds"], 2)
    result["outputs_vs_baseline_b2"] = compare(outs[0], base, prompts, specs)
    return result


class Passthrough:
    """A stage that does nothing: Ray Data's and the actors' own overhead."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return batch

    def run(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return rows


def probe_startup(n: int, stages: int = 3) -> dict:
    """Seconds to the first row and to all `n` rows through `stages` no-op stages: Ray Data actor pools
    vs plain actors chained by the driver (one actor per stage, each row's call fed the previous ref)."""
    import ray
    from ray.data import DataContext

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    share = min(1.0, cpus / stages)
    result = {}
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    for attempt in range(2):
        start = time.perf_counter()
        ds = ray.data.from_items([{"index": i} for i in range(n)], override_num_blocks=n)
        for _ in range(stages):
            ds = ds.map_batches(
                Passthrough, concurrency=1, batch_size=1, num_cpus=share, batch_format="numpy"
            )
        first = None
        for _ in ds.iter_rows():
            first = first or time.perf_counter() - start
        result[f"ray_data_run{attempt}"] = {
            "first_row_s": round(first, 3),
            "all_s": round(time.perf_counter() - start, 3),
        }

        start = time.perf_counter()
        actors = [ray.remote(num_cpus=share)(Passthrough).remote() for _ in range(stages)]
        refs = []
        for i in range(n):
            ref = [{"index": i}]
            for actor in actors:
                ref = actor.run.remote(ref)
            refs.append(ref)
        ray.get(refs[0])
        first = time.perf_counter() - start
        ray.get(refs)
        result[f"actors_run{attempt}"] = {
            "first_row_s": round(first, 3),
            "all_s": round(time.perf_counter() - start, 3),
        }
        for actor in actors:
            ray.kill(actor)
    return result


def probe_resources(cascade_yaml: Path, work: Path, timeout: int) -> dict:
    """[1,1,2] replicas on a fresh 2-CPU in-process Ray (a child process each) at several CPUs per actor,
    rows from from_items or from a JSONL file (read tasks): finished or hung, seconds, when each stage's
    actors loaded and each stage's batches ran, warnings Ray printed, threads each actor's torch got."""
    result = {}
    cases = [("1.0", "items"), ("0.67", "items"), ("0.5", "items"), ("0.25", "items"), ("0.5", "json")]
    cases.append(("0.25", "json"))
    for cpus, source in cases:
        folder = str(work / f"res-{cpus}-{source}")
        cmd = [sys.executable, __file__, "--child", str(cascade_yaml), cpus, folder, str(timeout), source]
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            text, _ = proc.communicate(timeout=timeout + 90)
            status = {0: "finished", 3: f"no result after {timeout} s (watchdog)"}.get(proc.returncode, "")
            status = status or f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:  # the watchdog did not fire: end the child's process group
            os.killpg(proc.pid, signal.SIGKILL)
            text, _ = proc.communicate()
            status = f"killed after {timeout + 90} s"
        lines = text.splitlines()
        found = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]
        notes = [
            line.strip()[:300]
            for line in lines
            if any(w in line for w in ("WARN", "Warning", "warning", "⚠", "insufficient", "Insufficient"))
        ]
        result[f"{cpus} cpu/actor, {source}"] = {
            "status": status,
            "seconds": round(time.perf_counter() - start, 1),
            "result": found[0] if found else None,
            "warnings": sorted(set(notes))[:12],
        }
    return result


def timeline(probe: Path, start_wall: float) -> dict[str, Any]:
    """Per stage, seconds from `start_wall`: when each actor had loaded (with its torch threads and
    OMP_NUM_THREADS), the first batch start and the last batch end, batches done; whether stages
    overlapped in time."""
    calls, stages = read_calls(probe), {}
    for p in actor_pids(probe):
        entry = stages.setdefault(p["stage"], {"loaded_s": [], "threads": []})
        entry["loaded_s"].append(round(p["time"] - start_wall, 2))
        entry["threads"].append((p["torch_threads"], p.get("OMP_NUM_THREADS")))
    for k, entry in stages.items():
        mine = [c for c in calls if c["stage"] == k]
        starts = [c["time"] - start_wall for c in mine if c["event"] == "start"]
        ends = [c["time"] - start_wall for c in mine if c["event"] == "end"]
        entry["first_batch_s"] = round(min(starts), 2) if starts else None
        entry["last_batch_end_s"] = round(max(ends), 2) if ends else None
        entry["batches_done"] = len(ends)
    ordered = [stages[k] for k in sorted(stages)]
    overlap = all(
        b["first_batch_s"] is not None
        and a["last_batch_end_s"] is not None
        and b["first_batch_s"] < a["last_batch_end_s"]
        for a, b in itertools.pairwise(ordered)
    )
    return {"stages": {str(k): stages[k] for k in sorted(stages)}, "stages_overlapped": overlap}


def child(cascade_yaml: str, cpus: str, folder: str, timeout: str, source: str) -> None:
    """Resource probe body: 6 prompts of the tiny cascade at [1,1,2], `cpus` per actor, on a new 2-CPU
    Ray; one RESULT line. A watchdog reports what had started after `timeout` s and exits 3."""
    import ray

    ensure_ray(num_cpus=2)
    specs = prepare_stages(load_cascade(Path(cascade_yaml)), seed=0)
    prompts = [f"{i}: {CAPTIONS[i % 4]}" for i in range(6)]
    probe = Path(folder) / "probe"
    finished, start = threading.Event(), time.time()

    def watchdog() -> None:
        if finished.wait(float(timeout)):
            return
        report = {"hung_after_s": float(timeout), "available_resources": ray.available_resources()}
        print("RESULT " + json.dumps({**report, **timeline(probe, start)}), flush=True)
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    run = ray_data_render(
        specs, prompts, Path(folder) / "out", [1, 1, 2], num_cpus=float(cpus), probe_dir=probe, source=source
    )
    finished.set()
    report = {"rows": len(run["rows"]), "seconds": round(run["seconds"], 2), "raised": run["raised"]}
    print("RESULT " + json.dumps({**report, **timeline(probe, run["start_wall"])}), flush=True)


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------


def tiny_cascade(root: Path) -> Path:
    """The tests' tiny 3-stage video cascade (tests/render_fixtures.py) under `root`; its YAML."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.render_fixtures import VIDEO_STAGES, build_cascade

    return build_cascade(root, VIDEO_STAGES)


def build(args: argparse.Namespace, scratch: Path) -> CascadeConfig:
    """The cascade to render: the tiny test cascade, or --cascade with untrained checkpoints."""
    if args.cascade is None:
        path = tiny_cascade(scratch / "tiny")
        overrides = [f"stages.{i}.steps={args.steps}" for i in range(3)] if args.steps else []
        return load_cascade(path, overrides)
    from render import build_checkpoints  # bench/render.py

    checkpoints = build_checkpoints(load_cascade(args.cascade), scratch / "ckpt", args.text_width)
    overrides = [f"stages.{i}.checkpoint={p}" for i, p in enumerate(checkpoints)]
    overrides += [f"stages.{i}.steps={args.steps}" for i in range(len(checkpoints))] if args.steps else []
    return load_cascade(args.cascade, overrides)


def compare_engines(
    cascade: CascadeConfig,
    specs: list[StageSpec],
    prompts: list[str],
    scratch: Path,
    args: argparse.Namespace,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The table rows (baseline, Ray Data [1,..,1] and [1,..,1,2], --repeat times) and the Ray Data checks."""
    rows, checks = [], {}
    n = len(specs)
    for r in range(args.repeat):
        base = scratch / f"actors-{r}"
        with PeakRSS() as rss:
            run = actor_render(cascade, prompts, base, args.batch, probe_dir=base / "_probe")
        rows.append(table_row("actors", [1] * n, prompts, {**run, "specs": specs}, rss.mib, base))
        for replicas in ([1] * n, [1] * (n - 1) + [2]):
            out = scratch / f"data-{''.join(map(str, replicas))}-{r}"
            with PeakRSS() as rss:
                run = ray_data_render(specs, prompts, out, replicas, args.batch, probe_dir=out / "_probe")
            rows.append(table_row("ray.data", replicas, prompts, {**run, "specs": specs}, rss.mib, out))
            first = run["first_row_s"]
            checks[f"{replicas} run {r}"] = {
                "raised": run["raised"],
                "pipeline_built_s": round(run["build_s"], 3) if run["build_s"] is not None else None,
                "first_row_at_driver_s": round(first, 2) if first else None,
                **{k: v for k, v in row_counts(run["rows"], len(prompts)).items() if k != "rows"},
                "timeline": timeline(out / "_probe", run["start_wall"]),
                "vs_actors": compare(out, base, prompts, specs),
            }
    return rows, checks


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cascade", type=Path, default=None, help="cascade YAML (default: tiny test cascade)"
    )
    parser.add_argument("--steps", type=int, default=0, help="sampler steps of every stage (0: the file's)")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--batch", type=int, default=1, help="prompts per stage batch")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the in-process Ray")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (printed)")
    parser.add_argument("--no-engines", action="store_true", help="only the probes")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each engine (alternating)")
    parser.add_argument("--text-width", type=int, default=64, help="--cascade: byte text encoder width")
    parser.add_argument(
        "--probe", nargs="*", default=[], choices=["kill", "error", "order", "startup", "resources"]
    )
    parser.add_argument("--probe-prompts", type=int, default=8, help="prompts per probe render")
    parser.add_argument("--timeout", type=int, default=120, help="resource probe: seconds before 'hung'")
    parser.add_argument("--out", type=Path, default=Path("bench/results/render_engines.json"))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="tessera-bench-engines-"))
    try:
        run_all(args, scratch)
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def run_all(args: argparse.Namespace, scratch: Path) -> None:
    """The engine table, then the probes; the JSON record."""
    import ray

    start = time.perf_counter()
    ensure_ray(num_cpus=args.cpus)
    ray_start_s = time.perf_counter() - start
    cascade = build(args, scratch)
    specs = prepare_stages(cascade, seed=0)
    prompts = [f"{i}: {CAPTIONS[i % len(CAPTIONS)]}" for i in range(args.prompts)]
    actor_render(cascade, prompts[:1], scratch / "warm", args.batch)  # untimed: worker pool, file caches
    ray_data_render(specs, prompts[:1], scratch / "warm-data", [1] * len(specs), args.batch)

    rows, checks = (
        compare_engines(cascade, specs, prompts, scratch, args) if not args.no_engines else ([], {})
    )
    print(
        f"Ray {ray.__version__}, in-process with {args.cpus} CPUs "
        f"(start {ray_start_s:.1f} s); batch {args.batch}"
    )
    if rows:
        print_table(rows)
    for name, check in checks.items():
        print(f"ray.data {name}: {check}")

    probes: dict[str, Any] = {}
    probe_prompts = prompts[: args.probe_prompts]
    for name in args.probe:
        work = scratch / f"probe-{name}"
        work.mkdir()
        if name == "kill":
            probes[name] = probe_kill(specs, probe_prompts, work)
        elif name == "error":
            probes[name] = probe_error(specs, probe_prompts, work)
        elif name == "order":
            probes[name] = probe_order(cascade, specs, probe_prompts, work)
        elif name == "startup":
            probes[name] = probe_startup(args.prompts)
        elif name == "resources":
            probes[name] = probe_resources(tiny_cascade(work / "tiny"), work, args.timeout)
        print(f"probe {name}: {json.dumps(probes[name], indent=1, default=str)}")

    record = {
        **record_header("render_engines", torch.device("cpu"), args, ray=ray.__version__),
        "cascade": cascade.name,
        "ray_start_s": round(ray_start_s, 2),
        "rows": rows,
        "checks": checks,
        "probes": probes,
    }
    write_record(args.out, json.loads(json.dumps(record, default=str)))


if __name__ == "__main__":
    main()
