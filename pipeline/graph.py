"""The stage graph of `pipeline run`: records, freshness, selection, concurrent execution and status.

A `GraphStage` is a named unit of work with dependencies, a fingerprint of its own settings, the paths it
writes and a function that does the work. Every run of a stage leaves a record in
`RUN_DIR/pipeline/stages/{name}.json`: its status (running, done, failed), fingerprint, a fresh
`run_id`, the run_ids of its dependencies it consumed (`inputs`), start, end, seconds, outputs, a
one-line summary and, on failure, the error.

A stage is **fresh** when its record is done, its fingerprint is the stage's current one, the run_ids
of its dependencies are still those it consumed, and its outputs exist. Fresh stages are skipped. Any
other stage runs, and so does everything downstream of it (their inputs change). A stage whose record
says running or failed with the same fingerprint and inputs *resumes* (its work keeps what the earlier
attempt committed); otherwise its outputs are deleted first.

Selection (`Selection`): `only` runs just the named stages, `from_` forces a stage and everything
downstream of it, `force` reruns stages even when fresh. Stages left out must be fresh wherever a
selected stage needs them. A name may also be a group: `train` stands for every `train-*` stage.

Ready stages run concurrently, each in a daemon thread of the driver (the heavy work inside goes to
Ray). Given the cluster's `capacity`, a stage that declares `resources` (a training's workers) starts
only when they fit beside the running stages' declared resources, so stages wait in the driver, in
order, rather than in Ray, which would grant them in whatever order its workers come up: the ready
stage with the largest `cost` starts first (the longest training, which bounds the run). A stage that
needs more than the whole capacity starts once nothing declared runs, and Ray queues its workers.
After a failure no new stage starts; the ones running finish. An interrupted run leaves records saying
running, and the next run resumes them.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.atomic import remove_leftovers, write_text
from stages.tables import column_table, format_duration

STATE_DIR = "pipeline"
"""Folder of the run directory holding the graph, the stage records and the lock."""


@dataclass
class GraphStage:
    """One node of the graph."""

    name: str
    deps: tuple[str, ...]
    fingerprint: str
    """Hash of the stage's own settings (its dependencies' results enter through their run_ids)."""
    outputs: list[Path]
    """What the stage writes: checked to exist for freshness, deleted before a non-resuming run."""
    run: Callable[[], str]
    """Does the work (resuming where it can); returns a one-line summary for the record and status."""
    detail: str = ""
    """What the stage does, for the plan table."""
    resources: dict[str, float] = field(default_factory=dict)
    """What the stage holds while it runs (Ray resource name → amount, e.g. {"CPU": 2}); empty for
    stages run_graph does not account for."""
    cost: float = 0.0
    """Expected time, in any unit (a training's FLOPs per worker): among ready stages the costliest
    starts first."""


@dataclass(frozen=True)
class Selection:
    """Which stages a run considers; see the module docstring."""

    only: tuple[str, ...] = ()
    from_: str = ""
    force: tuple[str, ...] = ()


@dataclass
class Plan:
    """Per stage: "run", "skip" (fresh), or "out" (not selected); plus why."""

    action: dict[str, str] = field(default_factory=dict)
    reason: dict[str, str] = field(default_factory=dict)
    resume: dict[str, bool] = field(default_factory=dict)


class GraphError(RuntimeError):
    """The graph cannot run as asked (bad selection, a needed stage not fresh, a held lock)."""


# --------------------------------------------------------------------------------------------- records


def state_dir(run_dir: Path) -> Path:
    return Path(run_dir) / STATE_DIR


def record_path(run_dir: Path, name: str) -> Path:
    return state_dir(run_dir) / "stages" / f"{name}.json"


def read_record(run_dir: Path, name: str) -> dict[str, Any] | None:
    """A stage's record, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads(record_path(run_dir, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def _current_inputs(stage: GraphStage, records: dict[str, dict[str, Any] | None]) -> dict[str, str]:
    return {dep: (records.get(dep) or {}).get("run_id", "") for dep in stage.deps}


def is_fresh(stage: GraphStage, records: dict[str, dict[str, Any] | None]) -> tuple[bool, str]:
    """Whether `stage` can be skipped, and why not when it cannot."""
    rec = records.get(stage.name)
    if rec is None:
        return False, "never ran"
    if rec.get("status") != "done":
        return False, f"last run {rec.get('status', 'unknown')}"
    if rec.get("fingerprint") != stage.fingerprint:
        return False, "settings changed"
    if rec.get("inputs") != _current_inputs(stage, records):
        return False, "inputs changed"
    missing = [str(p) for p in stage.outputs if not p.exists()]
    if missing:
        return False, f"outputs missing: {', '.join(missing)}"
    return True, "up to date"


# ------------------------------------------------------------------------------------------- selection


def _expand(names: Sequence[str], stages: Sequence[GraphStage], flag: str) -> set[str]:
    known = [s.name for s in stages]
    out: set[str] = set()
    for name in names:
        matches = [s for s in known if s == name or s.startswith(f"{name}-")]
        if not matches:
            raise GraphError(f"{flag} {name}: no such stage; the stages are {', '.join(known)}")
        out.update(matches)
    return out


def _descendants(stages: Sequence[GraphStage], roots: set[str]) -> set[str]:
    out = set(roots)
    for s in stages:  # stages are in topological order
        if out.intersection(s.deps):
            out.add(s.name)
    return out


def plan_graph(stages: Sequence[GraphStage], run_dir: Path, selection: Selection = Selection()) -> Plan:
    """Decide what runs; GraphError when a selected stage needs a left-out stage that is not fresh."""
    names = {s.name for s in stages}
    for s in stages:
        unknown = [d for d in s.deps if d not in names]
        if unknown:
            raise GraphError(f"stage {s.name} depends on unknown stages {unknown}")
    selected = names
    forced = _expand(selection.force, stages, "--force")
    if selection.only:
        selected = _expand(selection.only, stages, "--only")
    if selection.from_:
        start = _expand([selection.from_], stages, "--from")
        downstream = _descendants(stages, start)
        selected = selected & downstream if selection.only else downstream
        forced |= downstream
    records = {s.name: read_record(run_dir, s.name) for s in stages}
    plan = Plan()
    for s in stages:
        fresh, why = is_fresh(s, records)
        upstream_runs = [d for d in s.deps if plan.action[d] == "run"]
        if s.name not in selected:
            plan.action[s.name] = "out"
            plan.reason[s.name] = "up to date" if fresh else f"not selected ({why})"
            continue
        for dep in s.deps:
            if plan.action[dep] == "out" and plan.reason[dep] != "up to date":
                raise GraphError(
                    f"stage {s.name} needs {dep}, which is not selected and not up to date "
                    f"({plan.reason[dep]}); run it too (drop --only/--from, or add --only {dep})"
                )
        if s.name in forced:
            plan.action[s.name], plan.reason[s.name] = "run", "forced"
        elif not fresh:
            plan.action[s.name], plan.reason[s.name] = "run", why
        elif upstream_runs:
            plan.action[s.name], plan.reason[s.name] = "run", f"after {', '.join(upstream_runs)}"
        else:
            plan.action[s.name], plan.reason[s.name] = "skip", why
        rec = records[s.name]
        plan.resume[s.name] = (
            plan.action[s.name] == "run"
            and s.name not in forced
            and not upstream_runs
            and rec is not None
            and rec.get("status") in ("running", "failed")
            and rec.get("fingerprint") == s.fingerprint
            and rec.get("inputs") == _current_inputs(s, records)
        )
    return plan


def format_run_plan(stages: Sequence[GraphStage], plan: Plan) -> str:
    """A table: stage, action (run / resume / skip / —), why, what it does."""
    rows = []
    for s in stages:
        action = plan.action[s.name]
        shown = {"run": "resume" if plan.resume.get(s.name) else "run", "skip": "skip", "out": "—"}[action]
        rows.append((s.name, shown, plan.reason[s.name], s.detail))
    return column_table(("stage", "action", "why", "what"), rows)


# ------------------------------------------------------------------------------------------- execution


def _clean(stage: GraphStage, run_dir: Path) -> None:
    """Delete a stage's outputs before a run that does not resume; only paths inside the run directory."""
    root = Path(run_dir).resolve()
    for path in stage.outputs:
        resolved = path.resolve()
        if resolved != root and root not in resolved.parents:
            raise GraphError(f"stage {stage.name}: refusing to delete {path}, which is outside {run_dir}")
        if resolved.is_dir():
            shutil.rmtree(resolved)
        else:
            resolved.unlink(missing_ok=True)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def run_graph(
    stages: Sequence[GraphStage],
    run_dir: Path,
    plan: Plan,
    log: Callable[[str], None] = print,
    capacity: dict[str, float] | None = None,
) -> dict[str, str]:
    """Run the stages the plan says to run, concurrently as dependencies and `capacity` allow (see the
    module docstring; None: every ready stage starts at once); name → final status.

    The caller holds the run directory's folder lock (`stages.folder_lock`), so no other run writes it.
    A stage's exception is recorded (status failed, error) and reported in the returned statuses; it
    does not propagate.
    """
    run_dir = Path(run_dir)
    graph = [{"name": s.name, "deps": list(s.deps), "outputs": [str(p) for p in s.outputs]} for s in stages]
    by_name = {s.name: s for s in stages}
    status = {s.name: ("skipped" if plan.reason[s.name] == "up to date" else "not run") for s in stages}
    _write_json(state_dir(run_dir) / "graph.json", {"stages": graph})
    pending = [s.name for s in stages if plan.action[s.name] == "run"]
    finished: queue.Queue[tuple[str, str]] = queue.Queue()
    running: set[str] = set()
    waiting: set[str] = set()  # told the log once that it waits for resources
    failed = False
    while pending or running:
        if not failed:
            ready = [n for n in pending if all(status[d] in ("skipped", "done") for d in by_name[n].deps)]
            for name in sorted(ready, key=lambda n: -by_name[n].cost):  # stable: graph order on ties
                held = [by_name[n].resources for n in running]
                if not _fits(by_name[name].resources, held, capacity):
                    if name not in waiting:
                        waiting.add(name)
                        log(f"[{name}] waiting for {_format_resources(by_name[name].resources)}")
                    continue
                pending.remove(name)
                running.add(name)
                status[name] = "running"
                threading.Thread(
                    target=_run_stage,
                    args=(by_name[name], run_dir, plan.resume[name], finished, log),
                    name=f"stage-{name}",
                    daemon=True,
                ).start()
        if not running:
            break
        name, outcome = finished.get()
        running.discard(name)
        status[name] = outcome
        failed = failed or outcome == "failed"
    remove_leftovers(run_dir)  # no stage runs any more: what a killed earlier run left half-written
    return status


def _fits(need: dict[str, float], held: list[dict[str, float]], capacity: dict[str, float] | None) -> bool:
    """Whether a stage needing `need` may start beside running stages holding `held`."""
    if capacity is None or not need or not any(held):
        return True
    return all(
        amount + sum(h.get(key, 0.0) for h in held) <= capacity.get(key, 0.0) for key, amount in need.items()
    )


def _format_resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {key}" for key, amount in resources.items())


def _run_stage(
    stage: GraphStage, run_dir: Path, resume: bool, finished: queue.Queue, log: Callable[[str], None]
) -> None:
    records = {d: read_record(run_dir, d) for d in stage.deps}
    record: dict[str, Any] = {
        "stage": stage.name,
        "status": "running",
        "fingerprint": stage.fingerprint,
        "inputs": _current_inputs(stage, records),
        "outputs": [str(p) for p in stage.outputs],
        "started": _now(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }
    start = time.monotonic()
    try:
        if not resume:
            _clean(stage, run_dir)
        _write_json(record_path(run_dir, stage.name), record)
        log(f"[{stage.name}] {'resuming' if resume else 'started'}")
        summary = stage.run()
        record.update(status="done", run_id=uuid.uuid4().hex[:12], summary=summary)
        outcome = "done"
    except BaseException as err:  # recorded, then reported by run_graph; KeyboardInterrupt stays in main
        record.update(status="failed", error=f"{type(err).__name__}: {err}")
        record["traceback"] = traceback.format_exc(limit=8)
        outcome = "failed"
    seconds = time.monotonic() - start
    record.update(finished=_now(), seconds=round(seconds, 1))
    _write_json(record_path(run_dir, stage.name), record)
    if outcome == "done":
        log(f"[{stage.name}] done in {format_duration(seconds)}: {record['summary']}")
    else:
        log(f"[{stage.name}] FAILED after {format_duration(seconds)}: {record['error']}")
    finished.put((stage.name, outcome))


# --------------------------------------------------------------------------------------------- status


def _alive(record: dict[str, Any]) -> bool:
    """Whether the process that wrote a running record still exists (only knowable on its host)."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record.get("pid", -1)), 0)
    except (OSError, ValueError):
        return False
    return True


def status_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Each stage of the run's last graph with its state: done, stale, running, interrupted, failed,
    or not run; its time, outputs (and whether they exist) and summary or error."""
    run_dir = Path(run_dir)
    try:
        graph = json.loads((state_dir(run_dir) / "graph.json").read_text(encoding="utf-8"))["stages"]
    except (OSError, ValueError, KeyError, TypeError):
        raise GraphError(f"{run_dir} is not a pipeline run directory (no {STATE_DIR}/graph.json)") from None
    records = {g["name"]: read_record(run_dir, g["name"]) for g in graph}
    rows = []
    for g in graph:
        rec = records[g["name"]]
        state = "not run" if rec is None else str(rec.get("status"))
        if state == "running" and not _alive(rec):
            state = "interrupted"
        if state == "done":
            consumed = rec.get("inputs", {})
            if any((records.get(d) or {}).get("run_id") != consumed.get(d) for d in g["deps"]):
                state = "stale"
        outputs = [(p, Path(p).exists()) for p in g["outputs"]]
        rows.append(
            {
                "stage": g["name"],
                "state": state,
                "seconds": (rec or {}).get("seconds"),
                "finished": (rec or {}).get("finished", ""),
                "outputs": outputs,
                "note": (rec or {}).get("summary") or (rec or {}).get("error") or "",
            }
        )
    return rows


def format_status(rows: list[dict[str, Any]]) -> str:
    """The status rows as a table; missing outputs are marked."""
    table = []
    for r in rows:
        seconds = "" if r["seconds"] is None else format_duration(r["seconds"])
        outputs = ", ".join(p + ("" if ok else " (missing)") for p, ok in r["outputs"])
        table.append((r["stage"], r["state"], seconds, r["finished"], outputs, r["note"]))
    return column_table(("stage", "state", "time", "finished", "outputs", "note"), table)
