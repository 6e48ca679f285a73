"""The command line and launch.sh front door."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import av
import pytest

from configs import ConfigError, PipelineTrainingConfig, SynthConfig, load_config
from pipeline.cli import main
from stages.render.output import load_video_tensor
from tests import ROOT
from tests.render_fixtures import VIDEO_STAGES, build_cascade, write_cascade


def test_config_command_prints_loadable_yaml(tmp_path, capsys):
    assert main(["config", str(ROOT / "configs" / "tiny.yaml"), "model.depth=3"]) == 0
    out = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(out)
    cfg = load_config([tmp_path / "resolved.yaml"])
    assert cfg.model.depth == 3 and cfg.name == "tiny"
    assert "# fingerprint: " in out


def test_config_errors_exit_2_with_message(capsys):
    assert main(["config", "model.dpeth=3"]) == 2
    assert "did you mean 'model.depth'" in capsys.readouterr().err


def test_model_info(capsys):
    assert (
        main(["model-info", "model.preset=XL", "model.patch_size=[1,4,4]", "data.height=64", "data.width=64"])
        == 0
    )
    out = capsys.readouterr().out
    assert "width 1152, depth 28, heads 16" in out and "temporal_attention" in out


def test_run_names_a_bad_pipeline_key(tmp_path, capsys):
    config = tmp_path / "p.yaml"
    config.write_text("trainings:\n  base:\n    wrkers: 2\n")
    assert main(["run", str(config)]) == 2
    assert (
        "unknown key 'trainings.base.wrkers'; did you mean 'trainings.base.workers'?"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("key", "value", "expected"), [("shape_size", 0.9, "(0, 0.75]"), ("position_jitter", -0.5, "[0, 1]")]
)
def test_run_names_a_bad_synth_value(tmp_path, capsys, key, value, expected):
    config = tmp_path / "p.yaml"
    config.write_text(f"synth: {{{key}: {value}}}\n")
    assert main(["run", str(config)]) == 2
    assert f"synth.{key}: got {value}, expected a value in {expected}" in capsys.readouterr().err


def test_synth_command_defaults_are_the_synth_config_and_bad_values_name_the_field(tmp_path, capsys):
    from pipeline.cli import build_parser

    args = build_parser().parse_args(["synth", "--out", str(tmp_path)])
    assert {f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig)} == dataclasses.asdict(
        SynthConfig()
    )
    out = tmp_path / "out"
    assert main(["synth", "--out", str(out), "--count", "0", "--quiet"]) == 2
    assert "count: got 0, expected an integer >= 1" in capsys.readouterr().err and not out.exists()
    assert main(["synth", "--out", str(out), "--count", "2", "--size", "32", "--frames", "2", "--quiet"]) == 0
    params = json.loads((out / "synth.json").read_text())["params"]
    assert {k: params[k] for k in ("count", "size", "frames", "shape_size")} == {
        "count": 2,
        "size": 32,
        "frames": 2,
        "shape_size": SynthConfig.shape_size,
    }


def test_a_pipeline_checks_its_synth_section_as_run_synth_does(tmp_path, capsys):
    config = tmp_path / "p.yaml"
    config.write_text("synth: {size: 33}\n")
    assert main(["run", str(config)]) == 2
    assert "synth.size: got 33, expected an even size" in capsys.readouterr().err
    from pipeline.job import load_pipeline

    config.write_text("inputs: [videos/]\nsynth: {size: 33}\n")  # with inputs, nothing is synthesized
    assert load_pipeline([config]).synth.size == 33


@pytest.fixture(scope="module")
def cascade_file(tmp_path_factory) -> Path:
    return build_cascade(tmp_path_factory.mktemp("cascade"), VIDEO_STAGES)


def test_render_plan_loads_no_weights(tmp_path, capsys):
    ckpts = [tmp_path / "untrained" / s["name"] for s in VIDEO_STAGES]  # nothing there: the plan still works
    cascade = write_cascade(tmp_path / "c.yaml", VIDEO_STAGES, ckpts)
    assert main(["render", "--cascade", str(cascade), "--plan", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [
        (r["name"], r["kind"], r["frames"], r["height"], r["width"], r["fps"], r["steps"]) for r in rows
    ] == [
        ("base", "base", 4, 16, 16, 4.0, 2),
        ("tsr", "tsr", 8, 16, 16, 8.0, 2),
        ("ssr", "ssr", 8, 32, 32, 8.0, 2),
    ]
    assert main(["render", "--cascade", str(cascade), "--plan", "stages.1.steps=7"]) == 0
    table = capsys.readouterr().out
    assert "4×16×16@4 → 8×16×16@8" in table and "total" in table


def test_render_command_local(cascade_file, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na cat\na dog\n")
    out = tmp_path / "out"
    args = ["render", "--cascade", str(cascade_file), "--prompts", str(prompts), "--out", str(out)]
    assert main([*args, "--local", "--quiet", "--batch-size", "2", "--no-sheet", "--seed", "7"]) == 0
    printed = capsys.readouterr().out
    assert "0000-a-cat" in printed and "rendered" in printed
    assert (out / "0001-a-dog" / "video.mp4").is_file() and not (out / "0000-a-cat" / "sheet.png").exists()
    assert json.loads((out / "0000-a-cat" / "video.json").read_text())["seed"] == 7
    assert main([*args, "--local", "--quiet", "--seed", "7"]) == 0  # resumes: nothing left to do
    assert capsys.readouterr().out.count("skipped") == 2


def test_render_command_errors(cascade_file, tmp_path, capsys):
    base = ["render", "--cascade", str(cascade_file), "--out", str(tmp_path / "out"), "--local"]
    assert main(base) == 2
    assert "--prompts FILE or --prompt TEXT" in capsys.readouterr().err
    assert main([*base, "--prompt", ""]) == 2
    assert "prompt 0000 is empty" in capsys.readouterr().err
    assert main([*base, "--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert main(["render", "--cascade", str(tmp_path / "nope.yaml"), "--plan"]) == 2
    assert "config error" in capsys.readouterr().err
    assert main([*base, "--prompt", "x", "stages.9.steps=2"]) == 2
    assert "no stage '9'" in capsys.readouterr().err
    assert main([*base, "--prompt", "x", "--precision", "fp16"]) == 2
    assert "render.precision: unknown value 'fp16'; expected one of fp32, bf16" in capsys.readouterr().err
    assert (
        main(["upscale", "clip.mp4", "--cascade", str(cascade_file), "--from-stage", "base", "--out", "o"])
        == 2
    )
    assert "upscale starts at a super-resolution stage: tsr, ssr" in capsys.readouterr().err


def test_upscale_command_on_a_real_clip(media, cascade_file, tmp_path, capsys):
    clip = media("office_plant_h264_320x240_30.02fps_1s_audio.mp4")  # 1.2 s: enough for 4 frames at 4 fps
    out = tmp_path / "out"
    args = ["upscale", str(clip), "--cascade", str(cascade_file), "--from-stage", "tsr", "--out", str(out)]
    assert main([*args, "--prompt", "a plant", "--local", "--quiet"]) == 0
    job = out / "0000-office-plant-h264-320x240-30-02fps-1s-au"  # slugs stop at 40 characters
    assert job.name in capsys.readouterr().out
    assert tuple(load_video_tensor(job / "stages" / "02-ssr.safetensors").shape) == (3, 8, 32, 32)
    with av.open(str(job / "video.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 8 and frames[0].shape == (32, 32, 3)


def test_demo_trainings_declare_their_workers_and_the_base_goes_first():
    from pipeline.job import PipelineJob, load_pipeline

    job = PipelineJob(
        load_pipeline([ROOT / "configs" / "pipeline" / "demo.yaml"], ["trainings.ssr.workers=2"])
    )
    trainings = {s.name: s for s in job.stages() if s.name.startswith("train-")}
    assert trainings["train-base"].resources == trainings["train-tsr"].resources == {"CPU": 1.0}
    assert trainings["train-ssr"].resources == {"CPU": 2.0}
    # cost = steps × one worker's FLOPs per step: the base's work bounds the demo's time
    assert trainings["train-base"].cost > trainings["train-ssr"].cost > trainings["train-tsr"].cost > 0


def test_render_precision_is_checked_and_reruns_only_the_renders():
    from pipeline.job import PipelineJob, load_pipeline

    demo = [ROOT / "configs" / "pipeline" / "demo.yaml"]
    fingerprints = {
        precision: {
            s.name: s.fingerprint
            for s in PipelineJob(load_pipeline(demo, [f"render.precision={precision}"])).stages()
        }
        for precision in ("fp32", "bf16")
    }
    fp32, bf16 = fingerprints["fp32"], fingerprints["bf16"]
    # the cascade's render and its teachers' render beside it (the demo distils its base stage)
    assert {name for name in fp32 if fp32[name] != bf16[name]} == {"render", "render-teacher"}
    assert fp32 == {s.name: s.fingerprint for s in PipelineJob(load_pipeline(demo)).stages()}  # the default
    with pytest.raises(
        ConfigError, match=r"render\.precision: unknown value 'fp16'; expected one of fp32, bf16"
    ):
        load_pipeline(demo, ["render.precision=fp16"])


def test_ray_train_worker_defaults_are_a_pipeline_trainings():
    import inspect

    from pipeline.cli import build_parser
    from pipeline.ray_train import ray_train

    names = ("workers", "cpus_per_worker", "gpus_per_worker", "wait_for_workers_s")
    expected = {name: getattr(PipelineTrainingConfig(), name) for name in names}
    assert expected == {
        "workers": 1,
        "cpus_per_worker": 1,
        "gpus_per_worker": 0.0,
        "wait_for_workers_s": 600.0,
    }
    args = build_parser().parse_args(["train", "configs/tiny.yaml", "--ray"])
    assert {name: getattr(args, name) for name in names} == expected
    signature = inspect.signature(ray_train).parameters
    assert {name: signature[name].default for name in names} == expected
