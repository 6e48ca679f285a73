"""The run report of an end-to-end pipeline run: one static `index.html` and an overall contact sheet.

The page shows, top to bottom: the title and when it was made; `contact_sheet.png` (one row per finished
prompt, the last stage's frames across); a prompt-adherence table per cascade stage; one section per
finished prompt with every stage's clip (scaled up, pixelated) and, for prompts that are synthetic-dataset
captions, what `stages.synth.describe` reads from that stage's frames; a loss chart (inline SVG) and a
summary table per trained model; and the run's configs as collapsible YAML. A run with distilled stages
also gets a side-by-side section: each prompt through the distilled cascade and through its teachers,
with the network evaluations per video and the prompt checks of both.

The page is self-contained (no JavaScript, no external resources) and every link is relative to the
report's folder, so the folder can be moved or served as is. Everything taken from data (prompts,
names, config text) is HTML-escaped. Damaged or missing inputs become notes on the page, never errors:
a prompt folder without a readable `video.json` is unfinished and left out, a bad metrics line is
skipped, a missing metrics log reads "no metrics".
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from stages.atomic import write_text
from stages.media import contact_sheet, frame_indices
from stages.render import SIDECAR, load_video_tensor, read_json, video_frames
from stages.synth import Description, compare, describe, parse_caption
from stages.tables import format_duration
from stages.train import METRICS_FILE

INDEX = "index.html"
SHEET = "contact_sheet.png"
SHEET_FRAMES = 16
"""Frames per row of the overall contact sheet (evenly spaced, first and last included)."""
ATTRIBUTES = ("color", "shape", "direction")
"""The attributes `stages.synth.judge` can return, in display order."""

CELL_WIDTH = 192
"""CSS width (px) of each stage's clip on the page; small clips are scaled up with pixelated rendering."""

CHART_WIDTH, CHART_HEIGHT = 360, 200
CHART_MARGIN = {"left": 56, "right": 12, "top": 24, "bottom": 30}
LOG_SCALE_RATIO = 20.0
"""A loss chart uses a log y axis when max/min loss exceeds this."""

CHECK_EXPLANATION = (
    "For prompts that are synthetic-dataset captions, each stage's frames are read back: the colour is "
    "the nearest palette colour of the pixels that differ from the background; unless those pixels form "
    "one blob in most frames (scattered pieces have no shape and no motion), the shape comes from how "
    "much of its bounding box the blob fills and how it tapers towards the top, and the direction from "
    "how its centroid moves between the first and last quarter of the clip."
)

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { margin-bottom: 0.2em; }
.meta, .note { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
.stages { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; }
figcaption { font-size: 0.85em; }
.clip { width: 192px; height: auto; image-rendering: pixelated; background: #444; }
.sheet { max-width: 100%; image-rendering: pixelated; }
.ok { color: #080; } .bad { color: #b00; }
pre { background: #f6f6f6; padding: 0.5em; overflow-x: auto; }
svg text { font-size: 10px; fill: #333; }
""".replace("192px", f"{CELL_WIDTH}px")


# ---------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------


@dataclass
class ReportSummary:
    """What `write_report` wrote.

    `adherence` maps a stage name to counts over the prompts that are synthetic captions: `color`,
    `shape`, `direction` (attributes read correctly), `judged` (prompts judged at that stage: the
    denominator of colour and shape) and `moving` (judged prompts with a direction: the denominator of
    direction). It is empty when no prompt is a synthetic caption.
    """

    path: Path
    sheet: Path | None
    prompts: int
    adherence: dict[str, dict[str, int]]
    teacher_adherence: dict[str, dict[str, int]] = field(default_factory=dict)
    """The same counts for the undistilled cascade's videos (empty without a teacher render)."""


@dataclass
class StageView:
    """One stage of one prompt as the page shows it."""

    name: str
    shape: list[int]
    fps: float
    media: Path | None
    seen: str | None = None
    verdict: dict[str, bool] | None = None
    evaluations: int = 0
    """Network forward passes per video at this stage (steps × passes per step), 0 if not recorded."""


@dataclass
class PromptView:
    """One finished prompt: its text, stages, per-prompt sheet and the last stage's frames."""

    index: int
    text: str
    sheet: Path | None
    stages: list[StageView] = field(default_factory=list)
    final: np.ndarray | None = None


@dataclass
class TrainingView:
    """One model's metrics log, reduced to what the page shows."""

    name: str
    records: list[dict[str, Any]]


# ---------------------------------------------------------------------------------------------------
# Reading renders
# ---------------------------------------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_frames(path: Path) -> np.ndarray | None:
    """uint8 (T, H, W, 3) frames of a stage file, or None when it is missing or unreadable."""
    try:
        return video_frames(load_video_tensor(path))
    except Exception:  # a damaged stage file becomes a note on the page
        return None


def _stage_media(job_dir: Path, record: dict[str, Any], last: bool, output: str | None) -> Path | None:
    """The stage's viewable file: the sidecar's output for the last stage, else the file beside the
    stage tensor (`.mp4`, or `.png` for a still); None when it does not exist."""
    if last:
        path = job_dir / output if output else None
    else:
        fps = record.get("fps")
        suffix = ".mp4" if _is_number(fps) and fps > 0 else ".png"
        path = (job_dir / str(record.get("file", ""))).with_suffix(suffix)
    return path if path is not None and path.is_file() else None


def _judge_stage(stage: StageView, frames: np.ndarray, caption: Description | None) -> None:
    """Fill the stage's `seen` and `verdict` when the prompt is a synthetic caption."""
    if caption is None:
        return
    seen = describe(frames)
    stage.verdict = compare(seen, caption)
    stage.seen = seen.caption()


def _caption_or_none(text: str) -> Description | None:
    """The prompt parsed as a synthetic-dataset caption, else None (then it is not judged)."""
    try:
        return parse_caption(text)
    except ValueError:
        return None


def read_prompt(job_dir: Path) -> PromptView | None:
    """A finished prompt folder (one with a readable sidecar), or None for an unfinished one."""
    sidecar = read_json(job_dir / SIDECAR)
    if sidecar is None or not isinstance(sidecar.get("stages"), list) or not sidecar["stages"]:
        return None
    text = str(sidecar.get("prompt", ""))
    index = sidecar.get("index")
    sheet = job_dir / str(sidecar["sheet"]) if sidecar.get("sheet") else None
    view = PromptView(
        index=index if isinstance(index, int) else -1,
        text=text,
        sheet=sheet if sheet is not None and sheet.is_file() else None,
    )
    caption = _caption_or_none(text)
    records = [r for r in sidecar["stages"] if isinstance(r, dict)]
    for k, record in enumerate(records):
        last = k == len(records) - 1
        shape = record.get("shape")
        fps = record.get("fps")
        stage = StageView(
            name=str(record.get("name", f"stage {k}")),
            shape=[int(s) for s in shape]
            if isinstance(shape, list) and all(_is_number(s) for s in shape)
            else [],
            fps=float(fps) if _is_number(fps) else 0.0,
            media=_stage_media(job_dir, record, last, sidecar.get("output")),
            evaluations=_evaluations(record),
        )
        frames = _read_frames(job_dir / str(record.get("file", ""))) if record.get("file") else None
        if frames is not None:
            _judge_stage(stage, frames, caption)
            if last:  # keep only what the overall sheet shows
                view.final = frames[frame_indices(len(frames), SHEET_FRAMES)]
        view.stages.append(stage)
    return view


def _evaluations(record: dict[str, Any]) -> int:
    """Forward passes per video of a sidecar stage record: steps, doubled under classifier-free guidance
    unless the model was guidance-distilled (it takes the weight as an input)."""
    steps, guidance = record.get("steps"), record.get("guidance")
    if not isinstance(steps, int) or not isinstance(guidance, dict):
        return 0
    distilled = record.get("distilled")
    one_pass = isinstance(distilled, dict) and bool(distilled.get("guidance_range"))
    guided = guidance.get("scale") != 1 or guidance.get("schedule") == "oscillating"
    return steps * (2 if guided and not one_pass else 1)


def read_rendered_prompts(render_dir: Path) -> tuple[list[PromptView], int]:
    """Finished prompts of a render sorted by index, and how many prompt folders were unfinished."""
    views, unfinished = [], 0
    folders = sorted(p for p in Path(render_dir).iterdir() if p.is_dir()) if Path(render_dir).is_dir() else []
    for folder in folders:
        view = read_prompt(folder)
        if view is None:
            unfinished += 1
        else:
            views.append(view)
    views.sort(key=lambda v: v.index)
    return views, unfinished


def count_adherence(prompts: list[PromptView]) -> dict[str, dict[str, int]]:
    """Per stage (in cascade order): attributes read correctly, prompts judged, judged prompts moving."""
    counts: dict[str, dict[str, int]] = {}
    for prompt in prompts:
        for stage in prompt.stages:
            if stage.verdict is None:
                continue
            entry = counts.setdefault(
                stage.name, {"color": 0, "shape": 0, "direction": 0, "judged": 0, "moving": 0}
            )
            entry["judged"] += 1
            entry["moving"] += "direction" in stage.verdict
            for attribute, ok in stage.verdict.items():
                entry[attribute] += bool(ok)
    return counts


# ---------------------------------------------------------------------------------------------------
# Reading training metrics
# ---------------------------------------------------------------------------------------------------


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    """The metrics log's records sorted by step; lines that are not JSON objects with an integer `step`
    and a numeric `time` are skipped, and a missing or unreadable log gives []."""
    try:
        lines = (Path(out_dir) / METRICS_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        step = record.get("step")
        if isinstance(step, int) and not isinstance(step, bool) and _is_number(record.get("time")):
            records.append(record)
    return sorted(records, key=lambda r: r["step"])


def loss_points(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, loss) of the records with a finite loss (skipped steps log null)."""
    return [(r["step"], float(r["loss"])) for r in records if _is_number(r.get("loss"))]


# ---------------------------------------------------------------------------------------------------
# SVG loss chart
# ---------------------------------------------------------------------------------------------------


def _scale(lo: float, hi: float, out_lo: float, out_hi: float, log: bool):
    """A function mapping [lo, hi] (log-spaced if `log`) linearly onto [out_lo, out_hi]."""
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    span = hi - lo or 1.0

    def scale(value: float) -> float:
        v = math.log10(value) if log else value
        return out_lo + (v - lo) / span * (out_hi - out_lo)

    return scale


def _svg_text(x: float, y: float, text: str, anchor: str = "middle") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}">{html.escape(text)}</text>'


def loss_chart(points: list[tuple[int, float]], title: str) -> str:
    """An inline SVG line chart of loss against step, titled `title`; the y axis is logarithmic when the
    loss spans more than a factor `LOG_SCALE_RATIO` (and stays positive), linear otherwise."""
    steps = [s for s, _ in points]
    losses = [v for _, v in points]
    lo, hi = min(losses), max(losses)
    log = lo > 0 and hi / lo > LOG_SCALE_RATIO
    m = CHART_MARGIN
    left, right = m["left"], CHART_WIDTH - m["right"]
    top, bottom = m["top"], CHART_HEIGHT - m["bottom"]
    x = _scale(min(steps), max(steps), left, right, log=False)
    y = _scale(lo, hi, bottom, top, log=log)
    path = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_WIDTH}" height="{CHART_HEIGHT}" '
        f'viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" role="img" class="chart">',
        f"<title>{html.escape(title)}</title>",
        _svg_text(CHART_WIDTH / 2, 14, f"{title}: loss ({'log' if log else 'linear'} scale)"),
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#888"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#888"/>',
    ]
    for value in (lo, hi):  # y ticks: min and max loss
        parts.append(
            f'<line x1="{left - 4}" y1="{y(value):.1f}" x2="{left}" y2="{y(value):.1f}" stroke="#888"/>'
        )
        parts.append(_svg_text(left - 6, y(value) + 3, f"{value:.4g}", anchor="end"))
    for step in sorted({min(steps), max(steps)}):  # x ticks: first and last step
        parts.append(
            f'<line x1="{x(step):.1f}" y1="{bottom}" x2="{x(step):.1f}" y2="{bottom + 4}" stroke="#888"/>'
        )
        parts.append(_svg_text(x(step), bottom + 15, f"step {step}"))
    parts.append(f'<polyline fill="none" stroke="#2060c0" stroke-width="1.5" points="{path}"/>')
    if len(points) == 1:
        parts.append(f'<circle cx="{x(steps[0]):.1f}" cy="{y(losses[0]):.1f}" r="2.5" fill="#2060c0"/>')
    parts.append("</svg>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------
# HTML pieces
# ---------------------------------------------------------------------------------------------------


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _link(target: Path, run_dir: Path) -> str:
    """`target` relative to the report folder, URL-quoted and HTML-escaped for an attribute."""
    return _esc(quote(Path(os.path.relpath(target, run_dir)).as_posix()))


def _media_html(stage: StageView, run_dir: Path) -> str:
    if stage.media is None:
        return '<p class="note">no mp4 (render.save_intermediate=false)</p>'
    src = _link(stage.media, run_dir)
    if stage.media.suffix == ".png":
        return f'<img class="clip" src="{src}" alt="{_esc(stage.name)}">'
    return f'<video class="clip" src="{src}" autoplay loop muted playsinline></video>'


def _verdict_html(stage: StageView) -> str:
    if stage.verdict is None:
        return ""
    marks = " ".join(
        f'<span class="{"ok" if ok else "bad"}">{_esc(a)} {"✓" if ok else "✗"}</span>'
        for a, ok in stage.verdict.items()
    )
    return f"<br>seen: {_esc(stage.seen)}<br>{marks}"


def _stage_html(stage: StageView, run_dir: Path) -> str:
    size = "×".join(str(s) for s in stage.shape[1:]) or "?"
    rate = f"{stage.fps:g} fps" if stage.fps > 0 else "still"
    caption = f"<b>{_esc(stage.name)}</b> {size}, {rate}{_verdict_html(stage)}"
    return f'<figure class="stage">{_media_html(stage, run_dir)}<figcaption>{caption}</figcaption></figure>'


def _prompt_html(prompt: PromptView, run_dir: Path) -> str:
    cells = "\n".join(_stage_html(s, run_dir) for s in prompt.stages)
    sheet = ""
    if prompt.sheet is not None:
        sheet = f'<p><a href="{_link(prompt.sheet, run_dir)}">stage contact sheet</a></p>'
    return (
        f'<section class="prompt"><h3>#{prompt.index}: {_esc(prompt.text)}</h3>\n'
        f'<div class="stages">\n{cells}\n</div>{sheet}</section>'
    )


def _adherence_html(adherence: dict[str, dict[str, int]]) -> str:
    if not adherence:
        return '<p class="note">No prompt is a synthetic-dataset caption, so none was judged.</p>'
    rows = []
    for name, c in adherence.items():
        direction = f"{c['direction']}/{c['moving']}" if c["moving"] else "—"
        rows.append(
            f"<tr><td>{_esc(name)}</td><td>{c['color']}/{c['judged']}</td>"
            f"<td>{c['shape']}/{c['judged']}</td><td>{direction}</td></tr>"
        )
    head = "<tr><th>stage</th><th>color</th><th>shape</th><th>direction</th></tr>"
    return f"<p>{_esc(CHECK_EXPLANATION)}</p>\n<table>{head}\n" + "\n".join(rows) + "</table>"


def _comparison_html(
    prompts: list[PromptView],
    teachers: list[PromptView],
    adherence: dict,
    teacher_adherence: dict,
    run_dir: Path,
) -> str:
    """Each prompt through the distilled cascade beside the same prompt through the teachers, after a
    table of network evaluations per video and prompt checks per stage for both."""
    if not teachers:
        return ""
    first = {s.name: s.evaluations for s in (prompts or teachers)[0].stages}
    before = {s.name: s.evaluations for s in teachers[0].stages}
    rows = []
    for name in before:
        checks = [
            " / ".join(f"{c[a]}/{c['judged']}" for a in ("color", "shape")) if c else "—"
            for c in (adherence.get(name), teacher_adherence.get(name))
        ]
        rows.append(
            f"<tr><td>{_esc(name)}</td><td>{first.get(name, 0)}</td><td>{before[name]}</td>"
            f"<td>{_esc(checks[0])}</td><td>{_esc(checks[1])}</td></tr>"
        )
    head = (
        "<tr><th>stage</th><th>evaluations (distilled)</th><th>evaluations (teacher)</th>"
        "<th>colour / shape (distilled)</th><th>colour / shape (teacher)</th></tr>"
    )
    by_index = {t.index: t for t in teachers}
    pairs = []
    for prompt in prompts:
        teacher = by_index.get(prompt.index)
        if teacher is None:
            continue
        cells = [
            f'<div class="stages"><b>{label}</b>\n'
            + "\n".join(_stage_html(s, run_dir) for s in view.stages)
            + "</div>"
            for label, view in (("distilled", prompt), ("teacher", teacher))
        ]
        title = f"<h3>#{prompt.index}: {_esc(prompt.text)}</h3>"
        pairs.append(f'<section class="prompt">{title}\n{"".join(cells)}</section>')
    return (
        '<section id="distilled"><h2>Distilled against teacher</h2>\n'
        f"<table>{head}\n{''.join(rows)}</table>\n" + "\n".join(pairs) + "\n</section>"
    )


def _training_table(records: list[dict[str, Any]]) -> str:
    points = loss_points(records)
    rows = [
        ("steps", records[-1]["step"] + 1),
        ("first loss", f"{points[0][1]:.4g}" if points else "—"),
        ("last loss", f"{points[-1][1]:.4g}" if points else "—"),
        ("wall time", format_duration(records[-1]["time"] - records[0]["time"])),
    ]
    rates = [r["samples_per_s"] for r in records if _is_number(r.get("samples_per_s"))]
    if rates:
        rows.append(("samples/s (last)", f"{rates[-1]:.3g}"))
    buckets = [
        f"t{i} {records[-1][f'loss_t{i}']:.3g}" for i in range(4) if _is_number(records[-1].get(f"loss_t{i}"))
    ]
    if buckets:
        rows.append(("last loss by noise quartile", ", ".join(buckets)))
    return "<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows) + "</table>"


def _training_html(training: TrainingView) -> str:
    head = f"<h3>{_esc(training.name)}</h3>"
    if not training.records:
        return f'<section class="training">{head}<p class="note">no metrics</p></section>'
    points = loss_points(training.records)
    chart = loss_chart(points, training.name) if points else '<p class="note">no finite loss values</p>'
    return f'<section class="training">{head}\n{chart}\n{_training_table(training.records)}</section>'


def _configs_html(configs: dict[str, str]) -> str:
    if not configs:
        return '<p class="note">no configs</p>'
    return "\n".join(
        f"<details><summary>{_esc(label)}</summary><pre>{_esc(text)}</pre></details>"
        for label, text in configs.items()
    )


def render_page(
    *,
    title: str,
    run_dir: Path,
    prompts: list[PromptView],
    unfinished: int,
    sheet: Path | None,
    adherence: dict[str, dict[str, int]],
    trainings: list[TrainingView],
    configs: dict[str, str],
    comparison: str = "",
) -> str:
    """The whole `index.html` text."""
    stamp = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    skipped = f"; {unfinished} unfinished prompt folder(s) left out" if unfinished else ""
    sheet_html = (
        f'<img class="sheet" src="{_link(sheet, run_dir)}" alt="contact sheet">'
        if sheet is not None
        else '<p class="note">no finished prompt</p>'
    )
    prompts_html = "\n".join(_prompt_html(p, run_dir) for p in prompts) or '<p class="note">none</p>'
    trainings_html = "\n".join(_training_html(t) for t in trainings) or '<p class="note">no trainings</p>'
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{_esc(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>{_esc(title)}</h1>
<p class="meta">Generated {_esc(stamp)}; {len(prompts)} finished prompt(s){_esc(skipped)}.</p>
<section id="sheet"><h2>Contact sheet</h2>
{sheet_html}
</section>
<section id="adherence"><h2>Prompt adherence</h2>
{_adherence_html(adherence)}
</section>
<section id="prompts"><h2>Prompts</h2>
{prompts_html}
</section>
{comparison}
<section id="training"><h2>Training</h2>
{trainings_html}
</section>
<section id="configs"><h2>Configs</h2>
{_configs_html(configs)}
</section>
</body>
</html>
"""


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------


def write_overall_sheet(prompts: list[PromptView], run_dir: Path) -> Path | None:
    """`run_dir/contact_sheet.png`: one row per prompt whose last stage could be read, labelled with
    the prompt; None (and nothing written) when there is no such prompt."""
    shown = [p for p in prompts if p.final is not None]
    if not shown:
        return None
    path = Path(run_dir) / SHEET
    contact_sheet([p.final for p in shown], path, labels=[p.text for p in shown], max_frames=SHEET_FRAMES)
    return path


def write_report(
    run_dir: Path,
    *,
    title: str,
    configs: dict[str, str],
    trainings: dict[str, Path],
    render_dir: Path,
    teacher_dir: Path | None = None,
) -> ReportSummary:
    """Write `run_dir/index.html` and `run_dir/contact_sheet.png` for a finished (or partial) run.

    `configs` maps a label to YAML text, `trainings` a model name to its training `out_dir` (with
    `metrics.jsonl`), and `render_dir` is the renderer's output folder of per-prompt directories;
    `teacher_dir`, the same prompts rendered through the teachers of distilled stages.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prompts, unfinished = read_rendered_prompts(Path(render_dir))
    adherence = count_adherence(prompts)
    sheet = write_overall_sheet(prompts, run_dir)
    views = [TrainingView(name, read_metrics(Path(out_dir))) for name, out_dir in trainings.items()]
    teachers = read_rendered_prompts(Path(teacher_dir))[0] if teacher_dir is not None else []
    teacher_adherence = count_adherence(teachers)
    page = render_page(
        title=title,
        run_dir=run_dir,
        prompts=prompts,
        unfinished=unfinished,
        sheet=sheet,
        adherence=adherence,
        trainings=views,
        configs=configs,
        comparison=_comparison_html(prompts, teachers, adherence, teacher_adherence, run_dir),
    )
    path = run_dir / INDEX
    write_text(path, page)
    return ReportSummary(path, sheet, len(prompts), adherence, teacher_adherence)
