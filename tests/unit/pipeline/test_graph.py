"""The stage graph: skip when fresh, rerun what changed and everything after it, selection flags,
failure isolation and resume, concurrency, the lock and status — with plain-Python stages (no Ray)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from pipeline.graph import (
    GraphError,
    GraphStage,
    Selection,
    plan_graph,
    read_record,
    run_graph,
    status_rows,
)


class Toy:
    """A diamond a → (b, c) → d whose stages write one file each and count their runs."""

    def __init__(self, root: Path, settings: dict[str, str] | None = None) -> None:
        self.root = root
        self.settings = {"a": "1", "b": "1", "c": "1", "d": "1", **(settings or {})}
        self.runs: list[str] = []
        self.fail: set[str] = set()
        self.resumed: dict[str, bool] = {}

    def stages(self) -> list[GraphStage]:
        deps = {"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c")}
        return [
            GraphStage(n, deps[n], self.settings[n], [self.root / n], self._work(n), f"toy {n}") for n in deps
        ]

    def _work(self, name: str):
        def run() -> str:
            out = self.root / name
            self.resumed[name] = out.exists()  # an earlier attempt's partial output survived
            out.mkdir(parents=True, exist_ok=True)
            (out / "partial").write_text("x")
            if name in self.fail:
                raise RuntimeError(f"{name} broke")
            (out / "result").write_text(self.settings[name])
            self.runs.append(name)
            return f"{name} ok"

        return run

    def run(self, selection: Selection | None = None) -> dict[str, str]:
        stages = self.stages()
        plan = plan_graph(stages, self.root, selection or Selection())
        return run_graph(stages, self.root, plan, log=lambda _: None)


def test_second_run_skips_every_stage(tmp_path):
    toy = Toy(tmp_path)
    assert set(toy.run().values()) == {"done"}
    assert sorted(toy.runs) == ["a", "b", "c", "d"]
    toy.runs.clear()
    assert set(toy.run().values()) == {"skipped"}
    assert toy.runs == []
    assert {r["stage"]: r["state"] for r in status_rows(tmp_path)} == dict.fromkeys("abcd", "done")


def test_a_run_removes_what_a_killed_write_left(tmp_path):
    torn = tmp_path / "pipeline" / "stages" / "b.json.tmp-4242-4243"
    torn.parent.mkdir(parents=True)
    torn.write_text('{"stage": "b", "sta')
    toy = Toy(tmp_path)
    assert set(toy.run().values()) == {"done"}
    assert not torn.exists() and not list(tmp_path.rglob("*.tmp-*"))


def test_changed_settings_rerun_the_stage_and_its_descendants_only(tmp_path):
    Toy(tmp_path).run()
    toy = Toy(tmp_path, {"b": "2"})
    statuses = toy.run()
    assert sorted(toy.runs) == ["b", "d"]
    assert statuses["a"] == statuses["c"] == "skipped"
    assert (tmp_path / "b" / "result").read_text() == "2"


def test_missing_output_reruns_the_stage(tmp_path):
    Toy(tmp_path).run()
    (tmp_path / "c" / "result").unlink()
    (tmp_path / "c").rmdir() if not any((tmp_path / "c").iterdir()) else None
    import shutil

    shutil.rmtree(tmp_path / "c")
    toy = Toy(tmp_path)
    toy.run()
    assert sorted(toy.runs) == ["c", "d"]


def test_force_reruns_a_fresh_stage_from_scratch_and_what_follows(tmp_path):
    Toy(tmp_path).run()
    (tmp_path / "a" / "stray").write_text("left by an earlier run")
    toy = Toy(tmp_path)
    toy.run(Selection(force=("a",)))
    assert sorted(toy.runs) == ["a", "b", "c", "d"]
    assert not (tmp_path / "a" / "stray").exists()  # outputs are cleared before a non-resuming run
    assert toy.resumed["a"] is False


def test_from_reruns_a_stage_and_its_descendants(tmp_path):
    Toy(tmp_path).run()
    toy = Toy(tmp_path)
    statuses = toy.run(Selection(from_="c"))
    assert sorted(toy.runs) == ["c", "d"]
    assert statuses["a"] == statuses["b"] == "skipped"  # left out, and up to date


def test_only_runs_just_the_selected_stage_and_needs_fresh_dependencies(tmp_path):
    toy = Toy(tmp_path)
    with pytest.raises(GraphError, match="needs a"):
        plan_graph(toy.stages(), tmp_path, Selection(only=("b",)))
    toy.run(Selection(only=("a",)))
    assert toy.runs == ["a"]
    toy.run(Selection(only=("b",)))
    assert toy.runs == ["a", "b"]
    rows = {r["stage"]: r["state"] for r in status_rows(tmp_path)}
    assert rows == {"a": "done", "b": "done", "c": "not run", "d": "not run"}


def test_unknown_stage_names_are_refused_with_the_known_ones(tmp_path):
    with pytest.raises(GraphError, match="no such stage; the stages are a, b, c, d"):
        plan_graph(Toy(tmp_path).stages(), tmp_path, Selection(force=("e",)))


def test_group_names_select_every_stage_with_that_prefix(tmp_path):
    stages = [
        GraphStage("prep", (), "1", [], lambda: "ok"),
        GraphStage("train-x", ("prep",), "1", [], lambda: "ok"),
        GraphStage("train-y", ("prep",), "1", [], lambda: "ok"),
    ]
    run_graph(stages, tmp_path, plan_graph(stages, tmp_path), log=lambda _: None)
    plan = plan_graph(stages, tmp_path, Selection(from_="train"))
    assert plan.action == {"prep": "out", "train-x": "run", "train-y": "run"}
    only = plan_graph(stages, tmp_path, Selection(only=("train",)))
    assert only.action == {"prep": "out", "train-x": "skip", "train-y": "skip"}


def test_failure_stops_what_depends_on_it_and_a_rerun_resumes_it(tmp_path):
    toy = Toy(tmp_path)
    toy.fail = {"b"}
    statuses = toy.run()
    assert statuses["b"] == "failed" and statuses["d"] == "not run"
    assert statuses["a"] == "done"
    record = read_record(tmp_path, "b")
    assert record["status"] == "failed" and "b broke" in record["error"]
    assert {r["stage"]: r["state"] for r in status_rows(tmp_path)}["b"] == "failed"

    again = Toy(tmp_path)
    again.run()
    assert sorted(again.runs) == ["b", "d"]  # c finished in the first run, or it is rerun when b failed
    assert again.resumed["b"] is True  # same settings and inputs: the failed attempt's files were kept


def test_independent_stages_run_concurrently(tmp_path):
    both_running = threading.Barrier(2, timeout=10)

    def meet() -> str:
        both_running.wait()  # raises BrokenBarrierError unless the other stage runs at the same time
        return "met"

    stages = [
        GraphStage("a", (), "1", [], lambda: "ok"),
        GraphStage("b", ("a",), "1", [], meet),
        GraphStage("c", ("a",), "1", [], meet),
    ]
    statuses = run_graph(stages, tmp_path, plan_graph(stages, tmp_path), log=lambda _: None)
    assert statuses == {"a": "done", "b": "done", "c": "done"}


class Tracker:
    """Stage work that records start order and how many declared stages ran at once."""

    def __init__(self, hold: float = 0.2) -> None:
        self.hold, self.lock = hold, threading.Lock()
        self.started: list[str] = []
        self.running = self.most = 0

    def work(self, name: str):
        def run() -> str:
            with self.lock:
                self.started.append(name)
                self.running += 1
                self.most = max(self.most, self.running)
            time.sleep(self.hold)  # long enough for a wrongly admitted stage to overlap
            with self.lock:
                self.running -= 1
            return name

        return run


def test_stages_wait_for_capacity_and_the_costliest_starts_first(tmp_path):
    track, lines = Tracker(), []
    one_cpu = {"CPU": 1.0}
    stages = [GraphStage("a", (), "1", [], lambda: "ok")] + [
        GraphStage(n, ("a",), "1", [], track.work(n), resources=one_cpu, cost=cost)
        for n, cost in [("cheap", 1.0), ("big", 3.0), ("mid", 2.0)]
    ]
    statuses = run_graph(stages, tmp_path, plan_graph(stages, tmp_path), lines.append, capacity={"CPU": 2.0})
    assert set(statuses.values()) == {"done"}
    assert set(track.started[:2]) == {"big", "mid"} and track.started[2] == "cheap"
    assert track.most == 2
    assert "[cheap] waiting for 1 CPU" in lines


def test_without_capacity_declared_stages_all_start_at_once(tmp_path):
    track = Tracker()
    stages = [GraphStage(n, (), "1", [], track.work(n), resources={"CPU": 1.0}, cost=1.0) for n in "abc"]
    run_graph(stages, tmp_path, plan_graph(stages, tmp_path), log=lambda _: None)
    assert track.most == 3


def test_a_stage_larger_than_the_capacity_runs_alone(tmp_path):
    track = Tracker()
    stages = [
        GraphStage("huge", (), "1", [], track.work("huge"), resources={"CPU": 4.0, "GPU": 1.0}, cost=2.0),
        GraphStage("small", (), "1", [], track.work("small"), resources={"CPU": 1.0}, cost=1.0),
    ]
    statuses = run_graph(
        stages, tmp_path, plan_graph(stages, tmp_path), lambda _: None, capacity={"CPU": 2.0}
    )
    assert statuses == {"huge": "done", "small": "done"}
    assert track.started == ["huge", "small"] and track.most == 1


def test_interrupted_run_shows_as_interrupted_and_resumes(tmp_path):
    toy = Toy(tmp_path)
    toy.run(Selection(only=("a",)))
    path = tmp_path / "pipeline" / "stages" / "b.json"
    fake = {"stage": "b", "status": "running", "fingerprint": "1", "pid": 2**22 + 12345, "host": None}
    fake["inputs"] = {"a": read_record(tmp_path, "a")["run_id"]}
    import socket

    fake["host"] = socket.gethostname()
    path.write_text(json.dumps(fake))
    (tmp_path / "b").mkdir()
    rows = {r["stage"]: r["state"] for r in status_rows(tmp_path)}
    assert rows["b"] == "interrupted"
    plan = plan_graph(toy.stages(), tmp_path)
    assert plan.action["b"] == "run" and plan.resume["b"]
    assert not plan.resume["c"]


def test_status_of_a_directory_without_a_run_is_an_error(tmp_path):
    with pytest.raises(GraphError, match="not a pipeline run directory"):
        status_rows(tmp_path)


def test_clean_refuses_paths_outside_the_run_directory(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep").write_text("x")
    run_dir = tmp_path / "run"
    stages = [GraphStage("a", (), "1", [outside], lambda: "ok")]
    statuses = run_graph(stages, run_dir, plan_graph(stages, run_dir), log=lambda _: None)
    assert statuses == {"a": "failed"}
    assert (outside / "keep").exists()
    assert "outside" in read_record(run_dir, "a")["error"]
