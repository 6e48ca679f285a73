"""Non-finite numbers, unparsable overrides and zero step counts are refused with one line naming the
field; Ctrl-C ends a command with exit 130 and no traceback."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from typing import get_type_hints

import pytest

from configs import (
    CascadeStageConfig,
    ConfigError,
    PipelineConfig,
    RunConfig,
    SynthConfig,
    load_cascade,
    load_config,
)
from configs.validate import validate
from pipeline.cli import main
from tests import ROOT


def _float_fields(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of every float field of the dataclass `cls`, through nested sections."""
    names = []
    for name, hint in get_type_hints(cls).items():
        if hint is float:
            names.append(f"{prefix}{name}")
        elif dataclasses.is_dataclass(hint):
            names += _float_fields(hint, f"{prefix}{name}.")
    return names


RUN_FLOATS = _float_fields(RunConfig)
NON_FINITE = ["nan", "inf", "-inf"]


def test_the_walk_finds_the_float_fields_of_every_section():
    assert {"train.lr", "data.fps", "diffusion.guidance_scale", "preprocess.decode_timeout_s"} <= set(
        RUN_FLOATS
    )


@pytest.mark.parametrize("field", RUN_FLOATS)
@pytest.mark.parametrize("value", NON_FINITE)
def test_every_float_of_a_run_config_refuses_non_finite_values(field, value):
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: got {value}, expected a finite number$"):
        load_config(overrides=[f"{field}={value}"])


@pytest.mark.parametrize("field", _float_fields(CascadeStageConfig))
def test_every_float_of_a_cascade_stage_refuses_nan(tmp_path, field):
    cascade = tmp_path / "c.yaml"
    cascade.write_text("name: c\nstages:\n  - {name: base, kind: base}\n")
    with pytest.raises(ValueError, match=rf"stages\[0\]\.{field}: got nan, expected a finite number"):
        load_cascade(cascade, [f"stages.0.{field}=nan"])


@pytest.mark.parametrize(
    "field", _float_fields(PipelineConfig) + [f"synth.{f}" for f in _float_fields(SynthConfig)]
)
def test_every_float_of_a_pipeline_config_refuses_infinity(field):
    from pipeline.job import load_pipeline

    with pytest.raises(ConfigError, match=rf"{field}: got inf, expected a finite number"):
        load_pipeline([], [f"{field}=inf"])


def test_a_non_finite_value_set_in_code_is_refused_inside_lists_too():
    cfg = load_config()
    cfg.train.preview_prompts = ["a cat"]
    validate(cfg)
    bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mlp_ratio=float("nan")))
    with pytest.raises(ValueError, match=r"^model\.mlp_ratio: got nan"):
        validate(bad)


def test_data_fps_nan_is_refused_before_a_checkpoint_can_record_it(capsys):
    assert main(["config", "data.fps=nan"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "config error: data.fps: got nan, expected a finite number"


@pytest.mark.parametrize("override", ["model.depth=[1,", "train.lr={", "data.fps=[[]"])
def test_an_override_yaml_cannot_parse_is_one_line_naming_it(override, capsys):
    assert main(["config", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"override '{override}': the value is not valid YAML" in err


def test_a_cascade_override_yaml_cannot_parse_is_named(tmp_path):
    cascade = tmp_path / "c.yaml"
    cascade.write_text("name: c\nstages:\n  - {name: base, kind: base}\n")
    with pytest.raises(ConfigError, match=r"override 'stages\.0\.steps=\[': the value is not valid YAML"):
        load_cascade(cascade, ["stages.0.steps=["])


@pytest.mark.parametrize(
    ("text", "expected"), [("a: [1,\n", "not valid YAML"), ("- 1\n- 2\n", "expected a mapping")]
)
def test_a_config_file_that_is_not_a_yaml_mapping_is_named(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(path) in err and expected in err and "Traceback" not in err


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_zero_or_negative_training_steps_are_refused(steps):
    with pytest.raises(ConfigError, match=rf"train\.steps: got {steps}, expected > 0"):
        load_config(overrides=[f"train.steps={steps}"])


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(monkeypatch, capsys):
    import pipeline.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_config", interrupted)
    assert main(["config"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted: config stopped by Ctrl-C; rerun it to resume"


def test_sigint_to_a_running_job_exits_130_without_a_traceback(tmp_path):
    out = tmp_path / "synth"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "synth", "--out", str(out), "--count", "400", "--quiet"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (out / "video_00000.mp4").exists():  # the job is inside main, writing
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "interrupted: synth stopped by Ctrl-C; rerun it to resume"
