"""The whole graph at the smallest size on an in-process Ray: synth → preprocess → three trainings, the
base's two distillation rounds (guidance, then 2 → 1 steps) → render, render-teacher → report. Every
stage's outputs are checked for validity, and a second run skips every stage."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import av
import pytest
import yaml
from safetensors.torch import load_file

from configs import load_config
from models.dit import VideoDiT
from pipeline.cli import main
from pipeline.graph import read_record, status_rows
from stages.artifacts import resolve_committed

GEOMETRY = {"base": (4, 8, 8, 4.0), "tsr": (8, 8, 8, 8.0), "ssr": (8, 16, 16, 8.0)}
"""frames, height, width, fps of each model (and of its cascade stage)."""

PROMPTS = ["a red circle moving right", "a blue square moving up"]


def _training(kind: str) -> dict:
    frames, height, width, fps = GEOMETRY[kind]
    return {
        "model": {"preset": "tiny", "kind": kind, "patch_size": [1, 4, 4]},
        "diffusion": {"prediction": "v" if kind == "base" else "x0"},
        "data": {"frames": frames, "height": height, "width": width, "fps": fps, "batch_size": 4},
        "train": {"steps": 3, "lr": 1.0e-3, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 100},
    }


def _write_configs(root: Path) -> Path:
    def dump(name: str, data: dict) -> str:
        path = root / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return str(path)

    trainings = {}
    for kind in GEOMETRY:
        cfg = _training(kind)
        cfg["data"]["reduce"] = kind != "ssr"  # base and tsr shrink the 8×16×16 clips
        trainings[kind] = {"config": [dump(f"{kind}.yaml", cfg)]}
    # guidance folded in (the stage renders at weight 2), then the stage's 2 steps distilled to 1
    trainings["base"]["distill"] = {"rounds": [1], "guidance": [1, 3], "config": ["train.steps=2"]}
    stages = [
        {
            "name": kind,
            "kind": kind,
            "frames": frames,
            "height": height,
            "width": width,
            "fps": fps,
            "steps": 2,
            "guidance_scale": 2.0 if kind == "base" else 1.0,
            "cond_aug_level": 0.0 if kind == "base" else 0.1,
        }
        for kind, (frames, height, width, fps) in GEOMETRY.items()
    ]
    pipeline = {
        "name": "e2e",
        "out_dir": str(root / "run"),
        "synth": {"count": 12, "frames": 8, "size": 16, "fps": 8.0},
        "preprocess": [
            "data.frames=8",
            "data.height=16",
            "data.width=16",
            "model.patch_size=[1,4,4]",
            "preprocess.files_per_shard=6",
            "preprocess.workers=1",
        ],
        "trainings": trainings,
        "cascade": dump("cascade.yaml", {"name": "e2e", "stages": stages}),
        "prompts": PROMPTS,
        "render": {"batch_size": 2, "precision": "bf16"},
    }
    return Path(dump("pipeline.yaml", pipeline))


def _records(run: Path) -> dict[str, dict]:
    return {row["stage"]: read_record(run, row["stage"]) for row in status_rows(run)}


@pytest.mark.slow  # three trainings and a render on Ray
def test_pipeline_runs_every_stage_then_skips_them_all(tmp_path, capsys):
    config = _write_configs(tmp_path)
    run = tmp_path / "run"
    assert main(["run", str(config), "--quiet"]) == 0

    rounds = ["train-base-guidance", "train-base-distill-1"]
    stages = [
        "synth",
        "preprocess",
        "train-base",
        *rounds,
        "train-tsr",
        "train-ssr",
        "render",
        "render-teacher",
    ]
    stages.append("report")
    first = _records(run)
    assert list(first) == stages
    assert all(r["status"] == "done" for r in first.values()), {k: r.get("error") for k, r in first.items()}

    # shards: valid tars of samples whose count matches the manifest
    manifest = json.loads((run / "shards" / "manifest.json").read_text())
    assert manifest["discovered"] == manifest["processed"] == 12 and manifest["failed"] == 0
    keys = set()
    for shard in sorted((run / "shards" / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys |= {member.name.split(".", 1)[0] for member in tar.getmembers()}
    assert len(keys) == manifest["samples"] > 0

    # checkpoints: each model's EMA weights load strictly into the model its config describes
    for kind in GEOMETRY:
        step = resolve_committed(run / kind)
        cfg = load_config([step / "config.yaml"])
        assert cfg.model.kind == kind and cfg.train.steps == 3
        VideoDiT(cfg.model).load_state_dict(load_file(step / "exported" / "ema.safetensors"), strict=True)

    # videos: each prompt's final mp4 decodes to the last stage's frames and size, earlier stages too
    prompt_dirs = sorted((run / "renders").glob("0*"))
    assert len(prompt_dirs) == len(PROMPTS)
    for job in prompt_dirs:
        media = {
            "ssr": job / "video.mp4",
            "tsr": job / "stages" / "01-tsr.mp4",
            "base": job / "stages" / "00-base.mp4",
        }
        for kind, path in media.items():
            frames, height, width, _ = GEOMETRY[kind]
            with av.open(str(path)) as container:
                decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            assert len(decoded) == frames and decoded[0].shape == (height, width, 3), path
    assert json.loads((run / "renders" / "render.json").read_text())["precision"] == "bf16"

    # the distilled base: trained on Ray Train as its teacher was, rendered in one pass of one step at
    # the stage's weight; its teacher (two passes of two steps) rendered the same prompts beside it
    student = load_config([resolve_committed(run / "base-distill-1") / "config.yaml"])
    assert (student.distill.teacher, student.distill.steps) == (str(run / "base-guidance"), 1)
    assert student.model.guidance_range == [1.0, 3.0] and student.train.steps == 2
    for job in prompt_dirs:
        base = json.loads((job / "video.json").read_text())["stages"][0]
        assert (base["steps"], base["distilled"]["guidance_range"]) == (1, [1.0, 3.0])
        assert base["checkpoint"] == str(resolve_committed(run / "base-distill-1").resolve())
        teacher = json.loads((run / "renders-teacher" / job.name / "video.json").read_text())["stages"][0]
        assert teacher["steps"] == 2 and "distilled" not in teacher
    assert (run / "contact_sheet.png").is_file()
    page = (run / "index.html").read_text()
    assert all(prompt in page for prompt in PROMPTS)
    assert all(f"train-{kind}" in first and kind in page for kind in GEOMETRY)
    assert '<section id="distilled">' in page

    # a second run skips everything and changes no record
    capsys.readouterr()
    assert main(["run", str(config), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}" in out for name in stages)
    assert _records(run) == first
    assert "[synth] started" not in out and "started" not in out

    # status names every stage as done
    assert main(["status", str(run), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["stage"], r["state"]) for r in rows] == [(name, "done") for name in stages]

    # forcing the render reruns it (a name selects the stages it prefixes: render-teacher too) and the
    # report, nothing upstream
    assert main(["run", str(config), "--quiet", "--force", "render"]) == 0
    again = _records(run)
    rerun = [name for name in stages if again[name]["run_id"] != first[name]["run_id"]]
    assert rerun == ["render", "render-teacher", "report"]
