"""Rendering through a cascade on CPU with tiny hand-made checkpoints: shapes and files of each stage,
seeds, batch independence, resume after an interruption, and checks that fail before any model runs."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import deque
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from configs import RenderConfig, load_cascade
from stages.artifacts import resolve_committed
from stages.render import (
    Prompt,
    PromptJob,
    ReplicaLost,
    StageRecord,
    local_stage_executor,
    read_prompts_file,
    render,
)
from stages.render.output import load_video_tensor, read_json, slugify
from stages.render.schedule import schedule
from stages.render.stage import StageRunner
from tests.render_fixtures import IMAGE_STAGES, VIDEO_STAGES, build_cascade, write_cascade

PROMPTS = ["a red circle moving right", "a blue square", "a green triangle spinning"]


@pytest.fixture(scope="module")
def video_cascade(tmp_path_factory) -> Path:
    return build_cascade(tmp_path_factory.mktemp("cascade"), VIDEO_STAGES)


class Recorder:
    """A runner factory that logs every stage load and batch, and raises `error` on any batch holding
    prompt `fail_on[1]` at stage `fail_on[0]` (KeyboardInterrupt: the render is interrupted; an
    Exception: that prompt fails)."""

    def __init__(self, fail_on: tuple[str, int] | None = None, error: BaseException | None = None) -> None:
        self.log: list[tuple] = []
        self.fail_on = fail_on
        self.error = error or KeyboardInterrupt("simulated crash")

    def __call__(self, spec, device=None):
        self.log.append(("load", spec.name))
        runner = StageRunner(spec, device)
        recorder = self

        class Counting:
            def run(self, batch):
                indices = [item.index for item in batch]
                recorder.log.append(("run", spec.name, tuple(indices)))
                if recorder.fail_on and recorder.fail_on[0] == spec.name and recorder.fail_on[1] in indices:
                    raise recorder.error
                return runner.run(batch)

        return Counting()

    def runs(self) -> list[tuple]:
        return [entry[1:] for entry in self.log if entry[0] == "run"]


def outputs(out: Path) -> dict[str, torch.Tensor]:
    """Every stage tensor under a render directory, by relative path."""
    return {str(p.relative_to(out)): load_video_tensor(p) for p in sorted(out.glob("*/stages/*.safetensors"))}


def mp4_info(path: Path) -> tuple[int, Fraction, int, int]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, stream.average_rate, stream.codec_context.height, stream.codec_context.width


def settings(out: Path, **kw) -> RenderConfig:
    return RenderConfig(out_dir=str(out), **kw)


# ---------------------------------------------------------------------------------------------------
# Shapes and files
# ---------------------------------------------------------------------------------------------------


def test_tsr_doubles_frames_and_ssr_scales_frames(video_cascade, tmp_path):
    out = tmp_path / "out"
    summary = render(
        load_cascade(video_cascade), PROMPTS[:2], settings(out, batch_size=2), cascade_file="c.yaml"
    )
    assert [p["status"] for p in summary.prompts] == ["rendered", "rendered"]
    job = out / f"0000-{slugify(PROMPTS[0])}"
    shapes = {p.name: tuple(load_video_tensor(p).shape) for p in (job / "stages").glob("*.safetensors")}
    assert shapes == {
        "00-base.safetensors": (3, 4, 16, 16),
        "01-tsr.safetensors": (3, 8, 16, 16),
        "02-ssr.safetensors": (3, 8, 32, 32),
    }
    assert mp4_info(job / "stages" / "00-base.mp4") == (4, Fraction(4), 16, 16)
    assert mp4_info(job / "stages" / "01-tsr.mp4") == (8, Fraction(8), 16, 16)
    assert mp4_info(job / "video.mp4") == (8, Fraction(8), 32, 32)
    assert not (job / "stages" / "02-ssr.mp4").exists()  # the last stage is video.mp4
    sheet = np.asarray(Image.open(job / "sheet.png"))
    assert sheet.shape[0] > 3 * 16  # one row per stage
    sidecar = read_json(job / "video.json")
    assert sidecar["prompt"] == PROMPTS[0] and sidecar["index"] == 0 and sidecar["seed"] == 0
    assert sidecar["cascade"] == {"name": "test", "file": "c.yaml"}
    assert [s["name"] for s in sidecar["stages"]] == ["base", "tsr", "ssr"]
    assert [s["shape"] for s in sidecar["stages"]] == [[3, 4, 16, 16], [3, 8, 16, 16], [3, 8, 32, 32]]
    assert sidecar["stages"][1]["cond_aug_level"] == 0.1 and sidecar["stages"][1]["steps"] == 2
    assert all(s["seconds"] > 0 and s["batch_size"] == 2 for s in sidecar["stages"])
    assert Path(sidecar["stages"][0]["checkpoint"]).name == "step_00000010"
    run = json.loads((out / "render.json").read_text())
    assert [p["dir"] for p in run["prompts"]] == [job.name, f"0001-{slugify(PROMPTS[1])}"]


def test_options_turn_off_intermediates_and_sheet(video_cascade, tmp_path):
    out = tmp_path / "out"
    render(
        load_cascade(video_cascade), PROMPTS[:1], settings(out, save_intermediate=False, contact_sheet=False)
    )
    job = next(out.glob("0000-*"))
    assert sorted(p.name for p in job.iterdir()) == ["stages", "video.json", "video.mp4"]
    assert not list(job.glob("stages/*.mp4"))


def test_image_cascade_writes_png(tmp_path):
    cascade = build_cascade(tmp_path, IMAGE_STAGES, name="image")
    out = tmp_path / "out"
    render(load_cascade(cascade), ["a photo of a cat"], settings(out))
    job = out / "0000-a-photo-of-a-cat"
    assert tuple(load_video_tensor(job / "stages" / "01-ssr.safetensors").shape) == (3, 1, 32, 32)
    with Image.open(job / "image.png") as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    assert (job / "stages" / "00-base.png").is_file()
    assert read_json(job / "video.json")["output"] == "image.png"


# ---------------------------------------------------------------------------------------------------
# The scheduler alone
# ---------------------------------------------------------------------------------------------------


class FakeExecutor:
    """Stage replicas without models: finishes batches in submission order (replicas of equal speed),
    fails prompts in `fail`, loses the replica of the first `lose` batches submitted at `lose_stage`;
    records what it saw."""

    def __init__(self, fail: set[int] = frozenset(), lose: int = 0, lose_stage: int = 1) -> None:
        self.pending: deque = deque()
        self.batches: list[tuple[int, int, list[int]]] = []
        self.started: list[int] = []
        self.replaced: list[tuple[int, int]] = []
        self.peak = 0
        self.fail, self.lose, self.lose_stage = fail, lose, lose_stage

    def start(self, replicas):
        self.started = replicas

    def submit(self, stage, replica, jobs):
        assert all((s, r) != (stage, replica) for s, r, _ in self.pending), "two batches on one replica"
        self.pending.append((stage, replica, jobs))
        self.batches.append((stage, replica, [job.index for job in jobs]))
        self.peak = max(self.peak, len(self.pending))

    def next_result(self):
        stage, replica, jobs = self.pending.popleft()
        if stage == self.lose_stage and self.lose > 0:
            self.lose -= 1
            return stage, replica, ReplicaLost("node gone")
        return (
            stage,
            replica,
            [
                StageRecord(j.index, "failed", reason="bad")
                if j.index in self.fail and stage == 1
                else StageRecord(j.index, "done", 0.1, len(jobs))
                for j in jobs
            ],
        )

    def replace(self, stage, replica):
        self.replaced.append((stage, replica))

    def close(self):
        pass


def fake_jobs(tmp_path, n):
    return [PromptJob(i, f"p{i}", tmp_path / str(i), [], []) for i in range(n)]


def test_scheduler_pipelines_fixed_batches_over_every_replica(tmp_path):
    jobs = fake_jobs(tmp_path, 9)
    jobs[8].next = 2  # resumed: only the last stage left
    seen: list[tuple[int, int]] = []
    executor = FakeExecutor()
    schedule(jobs, [1, 1, 2], executor, 2, lambda job, p, r: seen.append((job.index, p)), window=8)
    assert executor.peak >= 3  # stages overlap
    by_stage = {p: [b for s, _, b in executor.batches if s == p] for p in range(3)}
    assert by_stage[0] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # formed once, in index order
    assert sorted(by_stage[2]) == [[0, 1], [2, 3], [4, 5], [6, 7], [8]]  # kept through every stage
    assert {r for s, r, _ in executor.batches if s == 2} == {0, 1}  # both ssr replicas used
    for i in range(8):  # each prompt through every stage in order; the resumed one only the last
        assert [p for j, p in seen if j == i] == [0, 1, 2]
    assert [p for j, p in seen if j == 8] == [2]
    assert all(job.next == 3 for job in jobs)
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        schedule(jobs, [1, 1, 1], FakeExecutor(), 0, lambda *a: None, window=4)


def test_scheduler_bounds_the_batches_in_progress(tmp_path):
    executor = FakeExecutor()
    in_progress, peak = set(), 0

    def done(job, p, record):
        nonlocal peak
        if p == 2:
            in_progress.discard(job.index)

    class Watching(FakeExecutor):
        def submit(self, stage, replica, jobs):
            nonlocal peak
            in_progress.update(j.index for j in jobs)
            peak = max(peak, len(in_progress))
            super().submit(stage, replica, jobs)

    executor = Watching()
    schedule(fake_jobs(tmp_path, 40), [1, 1, 1], executor, 1, done, window=3)
    assert peak == 3  # never more than `window` prompts started and unfinished
    assert len(executor.batches) == 120


def test_scheduler_isolates_failures_and_retries_lost_replicas(tmp_path):
    records: list[tuple[int, int, str]] = []
    executor = FakeExecutor(fail={2}, lose=2)
    jobs = fake_jobs(tmp_path, 4)
    schedule(jobs, [1, 1, 1], executor, 2, lambda j, p, r: records.append((j.index, p, r.status)), window=4)
    assert (2, 1, "failed") in records and not any(j == 2 and p == 2 for j, p, _ in records)
    assert [b for s, _, b in executor.batches if s == 2] == [[0, 1], [3]]  # its batch mate goes on
    assert executor.replaced == [(1, 0), (1, 0)]  # the two losses: replaced, their batches resubmitted
    assert [j.next for j in jobs] == [3, 3, 1, 3]  # the failed prompt still waits for its stage
    out_of_retries = FakeExecutor(lose=10)
    lost: list[tuple[int, str]] = []
    jobs = fake_jobs(tmp_path, 2)
    schedule(jobs, [1, 1, 1], out_of_retries, 2, lambda j, p, r: lost.append((p, r.reason)), window=4)
    assert lost[2:] == [(1, "replica lost 4 times: node gone")] * 2 and len(out_of_retries.replaced) == 4


# ---------------------------------------------------------------------------------------------------
# Seeds and batching
# ---------------------------------------------------------------------------------------------------


def test_seed_reproduces_and_batching_does_not_matter(video_cascade, tmp_path):
    cascade = load_cascade(video_cascade)
    a = outputs(render(cascade, PROMPTS, settings(tmp_path / "a", seed=3, batch_size=2)).out_dir)
    b = outputs(render(cascade, PROMPTS, settings(tmp_path / "b", seed=3, batch_size=2)).out_dir)
    assert a.keys() == b.keys() and len(a) == 9
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same batching: bitwise
    c = outputs(render(cascade, PROMPTS, settings(tmp_path / "c", seed=4, batch_size=2)).out_dir)
    assert all(not torch.allclose(a[k], c[k], atol=1e-3) for k in a)
    single = outputs(render(cascade, PROMPTS, settings(tmp_path / "d", seed=3, batch_size=1)).out_dir)
    for key in a:  # a prompt's video does not depend on its batch mates
        torch.testing.assert_close(a[key], single[key], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------------


def test_bf16_render_stays_close_to_fp32(video_cascade, tmp_path):
    """bf16 stage models give the fp32 render's shapes and stay within bf16 rounding of its values.

    bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.002 per operation); through every block,
    two sampler steps and three stages the per-pixel differences on this cascade are at most ~0.025
    and ~0.003 on average (outputs in [-1, 1], standard deviation ~0.6). The bounds leave about 2.5×
    headroom: no pixel off by more than 0.06, and the mean below one 8-bit output level (2/255)."""
    cascade = load_cascade(video_cascade)
    runners: list[StageRunner] = []

    def keep(spec, device=None):
        runners.append(StageRunner(spec, device))
        return runners[-1]

    fp32 = outputs(render(cascade, PROMPTS[:1], settings(tmp_path / "fp32")).out_dir)
    bf16_out = tmp_path / "bf16"
    render(cascade, PROMPTS[:1], settings(bf16_out, precision="bf16"), executor=local_stage_executor(keep))
    bf16 = outputs(bf16_out)
    assert [next(r.model.parameters()).dtype for r in runners] == [torch.bfloat16] * 3
    assert all(next(r.text.parameters()).dtype == torch.float32 for r in runners)
    assert bf16.keys() == fp32.keys() and len(fp32) == 3
    for key in fp32:
        assert bf16[key].shape == fp32[key].shape and bf16[key].dtype == torch.float32, key
        assert not torch.equal(bf16[key], fp32[key]), f"{key}: the bf16 render did not run in bf16"
        diff = (bf16[key] - fp32[key]).abs()
        assert diff.max() <= 0.06 and diff.mean() <= 2 / 255, (key, diff.max().item(), diff.mean().item())
    sidecar = read_json(next(bf16_out.glob("0000-*")) / "video.json")
    assert sidecar["precision"] == "bf16" and all(s["precision"] == "bf16" for s in sidecar["stages"])
    with pytest.raises(ValueError, match=r"stage 'base' precision: None now 'bf16'"):
        render(cascade, PROMPTS[:1], settings(tmp_path / "fp32", precision="bf16"))  # never mixed


def test_an_unknown_precision_is_named(video_cascade, tmp_path):
    recorder = Recorder()
    with pytest.raises(
        ValueError, match=r"render\.precision: unknown value 'fp16'; expected one of fp32, bf16"
    ):
        render(
            load_cascade(video_cascade),
            ["a cat"],
            settings(tmp_path / "out", precision="fp16"),
            executor=local_stage_executor(recorder),
        )
    assert recorder.log == [] and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------


def test_interrupted_render_resumes_without_recomputing(video_cascade, tmp_path):
    cascade = load_cascade(video_cascade)
    reference = outputs(render(cascade, PROMPTS, settings(tmp_path / "ref")).out_dir)
    out = tmp_path / "out"
    crash = Recorder(fail_on=("ssr", 1))
    with pytest.raises(KeyboardInterrupt, match="simulated crash"):
        render(cascade, PROMPTS, settings(out), executor=local_stage_executor(crash))
    # depth-first: prompt 0 finished, prompt 1 got through tsr, prompt 2 not started
    dirs = [out / f"{i:04d}-{slugify(p)}" for i, p in enumerate(PROMPTS)]
    assert (dirs[0] / "video.json").is_file() and not (dirs[1] / "video.json").exists()
    assert sorted(p.name for p in (dirs[1] / "stages").glob("*.safetensors")) == [
        "00-base.safetensors",
        "01-tsr.safetensors",
    ]
    assert not dirs[2].exists()

    again = Recorder()
    summary = render(cascade, PROMPTS, settings(out), executor=local_stage_executor(again))
    assert again.runs() == [("ssr", (1,)), ("base", (2,)), ("tsr", (2,)), ("ssr", (2,))]
    assert [p["status"] for p in summary.prompts] == [
        "skipped (done before)",
        "resumed after tsr",
        "rendered",
    ]
    final = outputs(out)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in final)

    # a prompt whose stages all exist but whose sidecar is missing is only finalized
    (dirs[0] / "video.json").unlink()
    (dirs[0] / "video.mp4").unlink()
    idle = Recorder()
    render(cascade, PROMPTS, settings(out), executor=local_stage_executor(idle))
    assert idle.log == [] and (dirs[0] / "video.json").is_file() and (dirs[0] / "video.mp4").is_file()


def test_a_rerun_removes_what_a_killed_write_left(video_cascade, tmp_path):
    cascade = load_cascade(video_cascade)
    out = tmp_path / "out"
    torn = out / f"0000-{slugify(PROMPTS[0])}" / "stages" / "01-tsr.safetensors.tmp-4242-4243"
    torn.parent.mkdir(parents=True)
    torn.write_bytes(b"half a tensor")
    render(cascade, PROMPTS[:1], settings(out))
    assert not torn.exists() and (torn.parent / "01-tsr.safetensors").is_file()
    assert not list(out.rglob("*.tmp-*"))


def test_an_export_without_text_config_renders_the_same(video_cascade, tmp_path):
    cascade = load_cascade(video_cascade)
    reference = outputs(render(cascade, PROMPTS[:1], settings(tmp_path / "ref")).out_dir)
    copies = []
    for stage in cascade.stages:  # checkpoints exported without text_config.yaml
        copy = tmp_path / "ckpt" / stage.name
        shutil.copytree(stage.checkpoint, copy)
        (resolve_committed(copy) / "exported" / "text_config.yaml").unlink()
        copies.append(dataclasses.replace(stage, checkpoint=str(copy)))
    old = dataclasses.replace(cascade, stages=copies)
    again = outputs(render(old, PROMPTS[:1], settings(tmp_path / "out")).out_dir)
    assert again.keys() == reference.keys()
    assert all(torch.equal(again[k], reference[k]) for k in again)


def test_rerun_with_other_settings_refuses_to_mix(video_cascade, tmp_path):
    cascade = load_cascade(video_cascade)
    out = tmp_path / "out"
    render(cascade, PROMPTS[:1], settings(out))
    with pytest.raises(ValueError, match=r"other settings \(seed: 0 now 1\)"):
        render(cascade, PROMPTS[:1], settings(out, seed=1))
    steps = load_cascade(video_cascade, ["stages.2.steps=3"])
    (next(out.glob("0000-*")) / "video.json").unlink()
    with pytest.raises(
        ValueError, match=r"02-ssr.safetensors was made with other settings \(stage 'ssr' steps: 2 now 3\)"
    ):
        render(steps, PROMPTS[:1], settings(out))


# ---------------------------------------------------------------------------------------------------
# Failing early
# ---------------------------------------------------------------------------------------------------


def test_bad_prompts_fail_before_any_model(video_cascade, tmp_path):
    cascade = load_cascade(video_cascade)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# my prompts\na cat\n\n   \nb" + "x" * 70 + "\n")
    prompts = read_prompts_file(prompts_file)
    assert [(p.text[:1], p.line) for p in prompts] == [("a", 2), ("b", 5)]
    recorder = Recorder()
    with pytest.raises(
        ValueError, match=r"prompt 0001 \(line 5 of .*prompts.txt\) is 71 UTF-8 bytes.*at most 63"
    ):
        render(cascade, prompts, settings(tmp_path / "out"), executor=local_stage_executor(recorder))
    with pytest.raises(ValueError, match=r"prompt 0001 is empty"):
        render(
            cascade,
            [Prompt("ok"), Prompt("  ")],
            settings(tmp_path / "out"),
            executor=local_stage_executor(recorder),
        )
    assert recorder.log == [] and not (tmp_path / "out").exists()


def test_missing_or_mismatched_checkpoint_fails_before_any_model(video_cascade, tmp_path):
    root = video_cascade.parent
    stages = [dict(s) for s in VIDEO_STAGES]
    ckpts = [root / "ckpt" / "base", root / "ckpt" / "tsr", tmp_path / "nowhere"]
    recorder = Recorder()
    missing = load_cascade(write_cascade(tmp_path / "missing.yaml", stages, ckpts))
    with pytest.raises(FileNotFoundError, match=r"stage 'ssr' checkpoint: .*nowhere does not exist"):
        render(missing, ["a cat"], settings(tmp_path / "out"), executor=local_stage_executor(recorder))
    ckpts[2] = root / "ckpt" / "tsr"  # a tsr checkpoint in the ssr stage
    wrong = load_cascade(write_cascade(tmp_path / "wrong.yaml", stages, ckpts))
    with pytest.raises(
        ValueError, match=r"stage 'ssr' \(checkpoint .*tsr.*\): the checkpoint is a tsr model"
    ):
        render(wrong, ["a cat"], settings(tmp_path / "out"), executor=local_stage_executor(recorder))
    partial = tmp_path / "partial"
    shutil.copytree(root / "ckpt" / "ssr", partial)
    (partial / "checkpoints" / "step_00000010" / "COMMITTED").unlink()
    ckpts[2] = partial
    uncommitted = load_cascade(write_cascade(tmp_path / "partial.yaml", stages, ckpts))
    with pytest.raises(FileNotFoundError, match=r"stage 'ssr' checkpoint: no committed checkpoint"):
        render(uncommitted, ["a cat"], settings(tmp_path / "out"), executor=local_stage_executor(recorder))
    assert recorder.log == [] and not (tmp_path / "out").exists()


def test_sr_factor_mismatch_names_both_values(video_cascade, tmp_path):
    root = video_cascade.parent
    stages = [dict(s) for s in VIDEO_STAGES]
    stages[2] = {**stages[2], "height": 48, "width": 48}  # ssr ×3, checkpoint trained ×2
    ckpts = [root / "ckpt" / name for name in ("base", "tsr", "ssr")]
    cascade = load_cascade(write_cascade(tmp_path / "x3.yaml", stages, ckpts))
    with pytest.raises(
        ValueError, match=r"stage 'ssr' .*model.sr_factor is 2, but the stage scales 'tsr' by 3"
    ):
        render(cascade, ["a cat"], settings(tmp_path / "out"))


# ---------------------------------------------------------------------------------------------------
# A failing prompt
# ---------------------------------------------------------------------------------------------------


class RefusesBrokenPrompts(StageRunner):
    """The tsr stage raises on any batch holding a prompt with "broken" in it."""

    def run(self, batch):
        if self.spec.name == "tsr" and any("broken" in item.prompt for item in batch):
            raise RuntimeError("injected: tsr cannot take this prompt")
        return super().run(batch)


def test_a_failing_prompt_is_recorded_the_rest_finish_and_the_render_exits_non_zero(
    video_cascade, tmp_path, monkeypatch, capsys
):
    from pipeline.cli import main

    prompts = ["a cat", "a broken dog", "a bird"]
    out = tmp_path / "out"
    args = ["render", "--cascade", str(video_cascade), "--out", str(out), "--local", "--quiet"]
    args += ["--batch-size", "2", *(a for p in prompts for a in ("--prompt", p))]
    reference = outputs(render(load_cascade(video_cascade), prompts, settings(tmp_path / "ref")).out_dir)
    monkeypatch.setattr("stages.render.worker.StageRunner", RefusesBrokenPrompts)
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert "FAILED prompt 1 at tsr: RuntimeError: injected: tsr cannot take this prompt" in printed
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert failures == [
        {
            "index": 1,
            "prompt": "a broken dog",
            "stage": "tsr",
            "reason": "RuntimeError: injected: tsr cannot take this prompt",
        }
    ]
    dirs = sorted(out.glob("000*"))
    assert [(d / "video.json").is_file() for d in dirs] == [True, False, True]
    assert sorted(p.name for p in (dirs[1] / "stages").glob("*.safetensors")) == ["00-base.safetensors"]
    run = json.loads((out / "render.json").read_text())
    assert [p["status"] for p in run["prompts"]] == ["rendered", "failed at tsr", "rendered"]
    assert [(s["prompts"], s["failed"]) for s in run["stages"]] == [(3, 0), (2, 1), (2, 0)]
    # its batch mate, sampled alone from tsr on, is the same video within float tolerance
    for key, video in outputs(out).items():
        torch.testing.assert_close(video, reference[key], atol=1e-4, rtol=0)

    monkeypatch.undo()  # the fix: the rerun renders the failed prompt from where it stopped
    assert main(args) == 0
    assert (out / "failures.jsonl").read_text() == ""
    run = json.loads((out / "render.json").read_text())
    assert [p["status"] for p in run["prompts"]][1] == "resumed after base"
    assert [s["prompts"] for s in run["stages"]] == [0, 1, 1]
    assert outputs(out).keys() == reference.keys()


def test_replicas_split_by_an_earlier_renders_timings_else_by_flops(video_cascade, tmp_path):
    from stages.render.job import stage_costs
    from stages.render.plan import split_replicas, videos_per_hour
    from stages.render.stage import prepare_stages

    cascade = load_cascade(video_cascade)
    specs = prepare_stages(cascade, 0)
    flops, source = stage_costs(specs, cascade, tmp_path)
    assert source == "estimated (FLOPs)" and flops[2] > flops[1] > flops[0] > 0  # ssr has the most tokens
    timed = [{"name": n, "prompts": 4, "seconds": s} for n, s in (("base", 8.0), ("tsr", 2.0), ("ssr", 4.0))]
    (tmp_path / "render.json").write_text(json.dumps({"stages": timed}))
    measured, source = stage_costs(specs, cascade, tmp_path)
    assert measured == [2.0, 0.5, 1.0] and source.startswith("measured")
    assert split_replicas(measured, 7) == [4, 1, 2]  # every stage at 0.5 s per video per replica
    assert videos_per_hour(measured, [4, 1, 2]) == 7200
    assert split_replicas(measured, 2) == [1, 1, 1]  # fewer devices than stages: they share
