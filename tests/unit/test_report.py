"""Run report on a fake run built without any model: synthetic clips as stage outputs of a two-stage
cascade (one prompt deliberately mismatched, one not a caption and full of HTML), unfinished prompt
folders, and training logs that are good, damaged or missing."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

from stages.media import contact_sheet
from stages.render.output import (
    SIDECAR,
    prompt_dir,
    save_video_tensor,
    stage_path,
    write_json,
    write_media,
)
from stages.report import loss_chart, write_report
from stages.synth import COLORS, plan_items, render_video
from stages.tables import format_duration

SIZE, FRAMES, FPS = 32, 8, 4.0
ODD_PROMPT = "a <b>bold</b> & friends"
CONFIG_TEXT = "render:\n  prompt: '<script>alert(1)</script> & more'\n"
ITEMS = plan_items(4, SIZE, seed=0, image_fraction=0.25)  # three moving clips, then one still
VIDEOS = [item for item in ITEMS if item["direction"] is not None]
STILL = next(item for item in ITEMS if item["direction"] is None)


# ---------------------------------------------------------------------------------------------------
# Building a fake run
# ---------------------------------------------------------------------------------------------------


def _tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) → float (C, T, H, W) in [-1, 1], exactly invertible by `video_frames`."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def _upsample(frames: np.ndarray) -> np.ndarray:
    """2× nearest-neighbour upsampling: what a perfect SSR stage would give for these pixel-exact shapes."""
    return np.repeat(np.repeat(frames, 2, axis=1), 2, axis=2)


def _write_prompt(
    render_dir: Path,
    index: int,
    text: str,
    stages: list[tuple[str, np.ndarray, float]],
    *,
    intermediate: bool = True,
    sheet: bool = True,
    finished: bool = True,
    sampling: dict[str, dict] | None = None,
) -> Path:
    """A prompt folder laid out like the renderer's: stage tensors, media, sheet, sidecar (written last);
    `sampling` adds fields (steps, guidance, distilled) to the named stages' records."""
    job = prompt_dir(render_dir, index, text)
    records = []
    for k, (name, frames, fps) in enumerate(stages):
        path = stage_path(job, k, name, ".safetensors")
        save_video_tensor(path, _tensor(frames), {"seconds": 0.5})
        if intermediate and k < len(stages) - 1:
            write_media(frames, stage_path(job, k, name, ""), fps)
        shape = [3, *frames.shape[:3]]
        records.append(
            {"name": name, "kind": name, "shape": shape, "fps": fps, "file": str(path.relative_to(job))}
            | (sampling or {}).get(name, {})
        )
    output = write_media(stages[-1][1], job / ("video" if stages[-1][2] > 0 else "image"), stages[-1][2])
    if sheet:
        contact_sheet([frames for _, frames, _ in stages], job / "sheet.png")
    if finished:
        write_json(
            job / SIDECAR,
            {
                "prompt": text,
                "index": index,
                "output": output.name,
                "sheet": "sheet.png" if sheet else None,
                "stages": records,
            },
        )
    return job


def _cascade(item: dict) -> list[tuple[str, np.ndarray, float]]:
    """base 8×32×32 then ssr 8×64×64 of one synthetic item."""
    base = render_video(item, FRAMES, SIZE)
    return [("base", base, FPS), ("ssr", _upsample(base), FPS)]


def _wrong_caption(item: dict) -> str:
    """The item's caption with another colour: the clip cannot match it."""
    wrong = next(c for c in COLORS if c != item["color"])
    return str(item["caption"]).replace(str(item["color"]), wrong, 1)


def _write_metrics(out_dir: Path) -> None:
    """Five good lines (loss 2 → 0.05 over 192 s) plus lines the reader must skip or tolerate."""
    out_dir.mkdir(parents=True)
    lines = [
        json.dumps({"step": 10 * i, "loss": loss, "time": 1000.0 + 48 * i, "samples_per_s": 12.5})
        for i, loss in enumerate([2.0, 0.9, 0.3, 0.1, 0.05])
    ]
    lines.insert(2, "{not json")
    lines.insert(3, "[1, 2, 3]")
    lines.insert(4, json.dumps({"step": "7", "loss": 1.0, "time": 1.0}))  # step not an int
    lines.insert(5, json.dumps({"step": 25, "loss": None, "time": 1100.0}))  # a skipped step
    (out_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n{torn", encoding="utf-8")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("run")
    render_dir = root / "render"
    matched, mismatched, odd = VIDEOS
    jobs = {
        "matched": _write_prompt(render_dir, 0, str(matched["caption"]), _cascade(matched)),
        "mismatched": _write_prompt(
            render_dir, 1, _wrong_caption(mismatched), _cascade(mismatched), intermediate=False
        ),
        "odd": _write_prompt(render_dir, 2, ODD_PROMPT, _cascade(odd), sheet=False),
        "unfinished": _write_prompt(
            render_dir, 3, "a green square moving up", _cascade(matched), finished=False
        ),
        "damaged": _write_prompt(
            render_dir, 4, "a yellow circle moving down", _cascade(matched), finished=False
        ),
    }
    (jobs["damaged"] / SIDECAR).write_text('{"prompt": "a yellow circle moving down", "sta', encoding="utf-8")
    _write_metrics(root / "train" / "base")
    report_dir = root / "report"
    summary = write_report(
        report_dir,
        title="Demo <run> & co",
        configs={"run.yaml": CONFIG_TEXT, "cascade <x>": "stages: []\n"},
        trainings={"base": root / "train" / "base", "ssr": root / "train" / "missing"},
        render_dir=render_dir,
    )
    return {
        "summary": summary,
        "html": summary.path.read_text(encoding="utf-8"),
        "report_dir": report_dir,
        "jobs": jobs,
        "captions": {"matched": matched["caption"], "mismatched": _wrong_caption(mismatched)},
    }


class _Links(HTMLParser):
    """Collects every src= and href= attribute value."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.links += [value for name, value in attrs if name in ("src", "href") and value]


def _section(page: str, marker: str) -> str:
    """The text of the `<section ...>` whose opening contains `marker`, up to its closing tag."""
    start = page.index(marker)
    return page[start : page.index("</section>", start)]


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------


def test_report_files_and_summary(run):
    summary, report_dir = run["summary"], run["report_dir"]
    assert summary.path == report_dir / "index.html" and summary.path.is_file()
    assert summary.sheet == report_dir / "contact_sheet.png"
    assert summary.prompts == 3
    assert not list(report_dir.glob("*.partial"))


def test_contact_sheet_has_one_row_per_finished_prompt(run):
    with Image.open(run["summary"].sheet) as image:
        image.load()
        height = image.height
    gap, frame_height = 2, 2 * SIZE  # contact_sheet's default gap; rows are the 64-px final stage
    assert height == gap + 3 * (frame_height + gap)
    assert 'src="contact_sheet.png"' in run["html"]


def test_finished_prompts_shown_in_order_unfinished_left_out(run):
    page = run["html"]
    positions = [page.index(f"#{i}: ") for i in range(3)]
    assert positions == sorted(positions)
    assert run["captions"]["matched"] in page and run["captions"]["mismatched"] in page
    assert "#3: " not in page and "#4: " not in page
    assert run["jobs"]["unfinished"].name not in page and run["jobs"]["damaged"].name not in page
    assert "2 unfinished prompt folder(s) left out" in page


def test_data_is_escaped(run):
    page = run["html"]
    assert "a &lt;b&gt;bold&lt;/b&gt; &amp; friends" in page
    assert "<b>bold" not in page
    assert "<title>Demo &lt;run&gt; &amp; co</title>" in page
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
    assert "<summary>cascade &lt;x&gt;</summary>" in page


def test_links_resolve_relative_to_report_dir(run):
    parser = _Links()
    parser.feed(run["html"])
    assert parser.links, "no links on the page"
    for link in parser.links:
        assert not link.startswith(("/", "http:", "https:")), link
        assert (run["report_dir"] / unquote(link)).is_file(), link
    jobs = run["jobs"]
    targets = {(run["report_dir"] / unquote(link)).resolve() for link in parser.links}
    assert (jobs["matched"] / "stages" / "00-base.mp4").resolve() in targets
    assert (jobs["matched"] / "sheet.png").resolve() in targets
    assert all((jobs[k] / "video.mp4").resolve() in targets for k in ("matched", "mismatched", "odd"))


def test_stage_cells(run):
    page = run["html"]
    # base mp4 of prompts 0 and 2, final video of all three; prompt 1 was rendered without intermediates
    assert page.count("<video ") == 5
    assert page.count("autoplay loop muted playsinline") == 5
    assert page.count("no mp4 (render.save_intermediate=false)") == 1
    assert "8×32×32, 4 fps" in page and "8×64×64, 4 fps" in page
    assert "image-rendering: pixelated" in page


def test_adherence_counts_and_seen_text(run):
    # the matched clip reads right everywhere; the mismatched one fails on colour only
    expected = {"color": 1, "shape": 2, "direction": 2, "judged": 2, "moving": 2}
    assert run["summary"].adherence == {"base": expected, "ssr": expected}
    page = run["html"]
    adherence = _section(page, '<section id="adherence">')
    assert "<td>base</td><td>1/2</td><td>2/2</td><td>2/2</td>" in adherence
    assert "nearest palette colour" in adherence
    matched = _section(page, "#0: ")
    assert matched.count(f"seen: {run['captions']['matched']}") == 2
    assert "✗" not in matched
    mismatched = _section(page, "#1: ")
    assert mismatched.count("color ✗") == 2 and mismatched.count("shape ✓") == 2
    assert "seen: " not in _section(page, "#2: ")  # not a caption: not judged


def test_training_sections(run):
    page = run["html"]
    base = _section(page, "<h3>base</h3>")
    assert base.count("<svg") == 1 and "<title>base</title>" in base
    assert "log scale" in base  # loss spans 2 → 0.05, a factor 40
    assert "<th>steps</th><td>41</td>" in base
    assert "<th>first loss</th><td>2</td>" in base and "<th>last loss</th><td>0.05</td>" in base
    assert "<th>wall time</th><td>3m 12s</td>" in base
    assert "<th>samples/s (last)</th><td>12.5</td>" in base
    ssr = _section(page, "<h3>ssr</h3>")
    assert "no metrics" in ssr and "<svg" not in ssr


def test_still_cascade_uses_png_and_judges_without_direction(tmp_path):
    still = render_video(STILL, 2, SIZE)[:1]  # start == end: one still frame
    job = _write_prompt(tmp_path / "render", 0, str(STILL["caption"]), [("base", still, 0.0)])
    summary = write_report(
        tmp_path / "render", title="stills", configs={}, trainings={}, render_dir=tmp_path / "render"
    )
    page = summary.path.read_text(encoding="utf-8")
    assert summary.adherence == {"base": {"color": 1, "shape": 1, "direction": 0, "judged": 1, "moving": 0}}
    assert f'<img class="clip" src="{job.name}/image.png"' in page
    assert "<td>base</td><td>1/1</td><td>1/1</td><td>—</td>" in page
    assert "no trainings" in page and "no configs" in page


def test_empty_render_dir(tmp_path):
    (tmp_path / "render").mkdir()
    summary = write_report(
        tmp_path / "out", title="t", configs={}, trainings={}, render_dir=tmp_path / "render"
    )
    assert summary.prompts == 0 and summary.sheet is None and summary.adherence == {}
    assert not (tmp_path / "out" / "contact_sheet.png").exists()
    assert "no finished prompt" in summary.path.read_text(encoding="utf-8")


def test_loss_chart_scale_choice():
    linear = loss_chart([(0, 1.0), (5, 0.5), (10, 0.2)], "m")
    assert "linear scale" in linear
    ys = [float(y) for y in re.findall(r",([\d.]+)", re.search(r'points="([^"]+)"', linear)[1])]
    # linear y: loss 0.5 lies (1 - 0.5) / (1 - 0.2) of the way down from the top (the max loss)
    assert ys[1] == pytest.approx(ys[0] + (ys[2] - ys[0]) * 0.5 / 0.8, abs=0.1)
    log = loss_chart([(0, 10.0), (1, 1.0), (2, 0.1)], "m")
    ys = [float(y) for y in re.findall(r",([\d.]+)", re.search(r'points="([^"]+)"', log)[1])]
    assert "log scale" in log and ys[1] == pytest.approx((ys[0] + ys[2]) / 2, abs=0.1)
    single = loss_chart([(3, 0.7)], "one")  # one point: no division by a zero span
    assert "<circle" in single and "nan" not in single


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (45.4, "45s"), (192, "3m 12s"), (7509, "2h 05m 09s"), (-3, "0s")]
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_distilled_stages_are_shown_beside_their_teachers(tmp_path):
    """A guidance- and step-distilled base (10 steps, one pass each) against its teacher (20 steps, two
    passes under guidance); the teacher's clip shows another colour than its prompt asks for."""
    matched, other = VIDEOS[0], next(v for v in VIDEOS if v["color"] != VIDEOS[0]["color"])
    guided = {"scale": 3.0, "schedule": "constant"}
    plain = {"steps": 4, "guidance": {"scale": 1.0, "schedule": "constant"}}
    distilled = {"teacher": "runs/base-guidance", "steps": 10, "guidance_range": [1.0, 4.0]}
    student = _write_prompt(
        tmp_path / "renders",
        0,
        str(matched["caption"]),
        _cascade(matched),
        sampling={"base": {"steps": 10, "guidance": guided, "distilled": distilled}, "ssr": plain},
    )
    teacher = _write_prompt(
        tmp_path / "renders-teacher",
        0,
        str(matched["caption"]),
        _cascade(other),
        sampling={"base": {"steps": 20, "guidance": guided}, "ssr": plain},
    )
    summary = write_report(
        tmp_path,
        title="distilled",
        configs={},
        trainings={},
        render_dir=tmp_path / "renders",
        teacher_dir=tmp_path / "renders-teacher",
    )
    assert summary.adherence["base"]["color"] == 1 and summary.teacher_adherence["base"]["color"] == 0
    page = summary.path.read_text(encoding="utf-8")
    section = page[page.index('<section id="distilled">') :]
    assert "<tr><td>base</td><td>10</td><td>40</td><td>1/1 / 1/1</td><td>0/1 / " in section
    assert "<tr><td>ssr</td><td>4</td><td>4</td>" in section
    assert "<b>distilled</b>" in section and "<b>teacher</b>" in section
    parser = _Links()
    parser.feed(section)
    targets = {(tmp_path / unquote(link)).resolve() for link in parser.links}
    assert (student / "stages" / "00-base.mp4").resolve() in targets
    assert (teacher / "stages" / "00-base.mp4").resolve() in targets


def test_a_report_without_a_teacher_render_has_no_comparison(run):
    assert 'id="distilled"' not in run["html"] and run["summary"].teacher_adherence == {}
