"""`bench/render.py --compare TEACHER STUDENT`: the same prompts rendered through two cascade files with
trained checkpoints, typically a cascade and the same cascade with distilled stages. A pipeline run with
distillation rounds writes both (`pipeline/cascade-teacher.yaml`, `pipeline/cascade.yaml`):

    python bench/render.py --compare runs/demo/pipeline/cascade-teacher.yaml runs/demo/pipeline/cascade.yaml

Per cascade and stage: steps, network passes per step and evaluations per video (steps × passes, as
`render --plan` counts them, distilled checkpoints resolved), milliseconds per video (the renderer's clock
around the stage's sampling), and the prompt checks of `stages.report` (colour, shape and direction read
back from the stage's frames against the caption: the prompts are synthetic-dataset captions, colours
× shapes × directions in a fixed shuffled order). Per cascade: the sums per video and the render's wall
clock per video; then the teacher's totals over the student's. Both renders run one after the other in
this process (local executor, batch --batch, fp32 unless --precision), each after an untimed one-prompt
warm-up render, into a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

from configs import RenderConfig, load_cascade
from stages.render import plan_cascade, render
from stages.report import count_adherence, read_rendered_prompts
from stages.synth.make import COLORS, DIRECTIONS, SHAPES

CAPTIONS = [f"a {c} {s} moving {d}" for c, s, d in itertools.product(COLORS, SHAPES, DIRECTIONS)]
"""Every synthetic caption of a moving shape (48), in a fixed shuffled order."""
random.Random(0).shuffle(CAPTIONS)


def _check(counts: dict[str, int] | None, attribute: str) -> str:
    if not counts:
        return "-"
    of = counts["moving"] if attribute == "direction" else counts["judged"]
    return f"{counts[attribute]}/{of}"


def cascade_rows(label: str, path: Path, prompts: list[str], settings: dict, scratch: Path) -> list[dict]:
    """Per stage of the cascade at `path`, then its per-video totals (see the module docstring)."""
    cascade = load_cascade(path)
    plan = plan_cascade(cascade)
    render(cascade, prompts[:1], RenderConfig(out_dir=str(scratch / f"{label}-warm"), **settings))
    out = scratch / label
    summary = render(cascade, prompts, RenderConfig(out_dir=str(out), **settings))
    if summary.failures:
        first = summary.failures[0]
        raise RuntimeError(f"{path}: prompt {first['index']} failed at {first['stage']}: {first['reason']}")
    adherence = count_adherence(read_rendered_prompts(out)[0])
    rows = []
    for row, stats in zip(plan, summary.stages, strict=True):
        counts = adherence.get(row["name"])
        rows.append(
            {
                "cascade": label,
                "stage": row["name"],
                "steps": row["steps"],
                "passes": row["passes"],
                "evaluations": row["steps"] * row["passes"],
                "ms_per_video": round(1e3 * stats["seconds"] / stats["prompts"], 1),
                **{attribute: _check(counts, attribute) for attribute in ("color", "shape", "direction")},
            }
        )
    blank = dict.fromkeys(rows[0], "-")
    total = {
        **blank,
        "cascade": label,
        "stage": "per video",
        "evaluations": sum(r["evaluations"] for r in rows),
        "ms_per_video": round(sum(r["ms_per_video"] for r in rows), 1),
    }
    wall = {
        **blank,
        "cascade": label,
        "stage": "wall / video",
        "ms_per_video": round(1e3 * summary.seconds / len(prompts), 1),
    }
    return [*rows, total, wall]


def compare(teacher: Path, student: Path, count: int, settings: dict, scratch: Path) -> dict[str, Any]:
    """Both cascades' rows and the teacher ÷ student ratios of evaluations and seconds per video."""
    prompts = [CAPTIONS[i % len(CAPTIONS)] for i in range(count)]
    rows = {
        label: cascade_rows(label, path, prompts, settings, scratch)
        for label, path in (("teacher", teacher), ("student", student))
    }
    totals = {label: next(r for r in rs if r["stage"] == "per video") for label, rs in rows.items()}
    walls = {label: rs[-1]["ms_per_video"] for label, rs in rows.items()}
    ratios = {
        "evaluations": round(totals["teacher"]["evaluations"] / totals["student"]["evaluations"], 2),
        "sampling_seconds": round(totals["teacher"]["ms_per_video"] / totals["student"]["ms_per_video"], 2),
        "wall_seconds": round(walls["teacher"] / walls["student"], 2),
    }
    return {"prompts": prompts, "rows": [*rows["teacher"], *rows["student"]], "teacher_over_student": ratios}
