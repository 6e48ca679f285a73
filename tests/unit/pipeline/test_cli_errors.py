"""The command line's answer to bad numbers, overrides, files, output folders and Ctrl-C: one line on
stderr and an exit status (2 for bad input, 130 for an interrupt), never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from tests import ROOT
from tests.render_fixtures import VIDEO_STAGES, write_cascade

TINY = str(ROOT / "configs" / "tiny.yaml")
DEMO_PIPELINE = str(ROOT / "configs" / "pipeline" / "demo.yaml")


def _one_line_error(capsys) -> str:
    """The single line main printed on stderr (asserting it printed nothing else there or on stdout)."""
    printed = capsys.readouterr()
    assert printed.out == ""
    lines = printed.err.splitlines()
    assert len(lines) == 1, printed.err
    return lines[0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=nan", "config error: train.lr: expected a finite number, got nan"),
        ("train.lr=inf", "config error: train.lr: expected a finite number, got inf"),
        ("data.fps=nan", "config error: data.fps: expected a finite number, got nan"),
        ("train.steps=0", "config error: train.steps: got 0, expected > 0"),
        ("model.depth=[1,", "config error: override 'model.depth=[1,': value '[1,' is not valid YAML: "),
        ("train.lr={", "config error: override 'train.lr={': value '{' is not valid YAML: "),
    ],
)
def test_bad_numbers_and_unreadable_overrides_are_one_line_exit_2(capsys, override, message):
    assert main(["config", TINY, override]) == 2
    assert _one_line_error(capsys).startswith(message)


def test_a_non_finite_fps_stops_training_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", TINY, "data.fps=nan", f"train.out_dir={out}", "--quiet"]) == 2
    assert _one_line_error(capsys) == "config error: data.fps: expected a finite number, got nan"
    assert not out.exists()


def test_a_config_file_yaml_cannot_parse_is_one_line_naming_the_file(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: {\n")
    assert main(["config", str(path)]) == 2
    assert _one_line_error(capsys).startswith(f"config error: {path}: not valid YAML at line 3, column 1: ")


# ---------------------------------------------------------------------------------------------------------
# Output folders that are files
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def untrained_cascade(tmp_path) -> Path:
    """A cascade whose checkpoints were never trained: nothing to load, so nothing is rendered."""
    return write_cascade(
        tmp_path / "c.yaml", VIDEO_STAGES, [tmp_path / "untrained" / s["name"] for s in VIDEO_STAGES]
    )


def _commands(cascade: Path, clip: Path, target: Path) -> dict[str, tuple[list[str], str]]:
    """Each command that writes a folder, given `target` as that folder: (argv, name in the error)."""
    render = ["--cascade", str(cascade), "--out", str(target), "--local", "--quiet"]
    return {
        "synth": (["synth", "--out", str(target), "--count", "2", "--quiet"], "--out"),
        "render": (["render", "--prompt", "a cat", *render], "--out"),
        "upscale": (["upscale", str(clip), "--from-stage", "tsr", *render], "--out"),
        "preprocess --out": (
            ["preprocess", str(clip), "--out", str(target), "--config", TINY, "--local", "--quiet"],
            "preprocess.out",
        ),
        "preprocess override": (
            ["preprocess", str(clip), f"preprocess.out={target}", "--config", TINY, "--local", "--quiet"],
            "preprocess.out",
        ),
        "train": (["train", TINY, f"train.out_dir={target}", "--quiet"], "train.out_dir"),
        "run --out": (["run", DEMO_PIPELINE, "--out", str(target), "--plan", "--quiet"], "out_dir"),
        "run override": (["run", DEMO_PIPELINE, f"out_dir={target}", "--plan", "--quiet"], "out_dir"),
    }


COMMANDS = list(_commands(Path(), Path(), Path()))


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_folder_that_is_a_file_is_one_line_exit_2_and_nothing_is_written(
    media, untrained_cascade, tmp_path, capsys, command
):
    target = tmp_path / "taken"
    target.write_text("not a folder\n")
    argv, name = _commands(
        untrained_cascade, media("office_plant_h264_320x240_30.02fps_1s_audio.mp4"), target
    )[command]
    before = sorted(tmp_path.rglob("*"))
    assert main(argv) == 2
    assert _one_line_error(capsys) == f"error: {name}: {target} is a file; expected a folder"
    assert target.read_text() == "not a folder\n" and sorted(tmp_path.rglob("*")) == before


def test_an_output_folder_below_a_file_names_the_file(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("")
    assert main(["synth", "--out", str(taken / "videos"), "--count", "2", "--quiet"]) == 2
    assert _one_line_error(capsys) == f"error: --out: {taken} is a file; expected a folder"


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------------------------------------


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("target", "argv"),
    [
        ("pipeline.cli.dump_config", ["config", TINY]),
        ("stages.synth.run_synth", ["synth", "--out", "never-written", "--quiet"]),
    ],
)
def test_an_interrupted_command_prints_one_line_and_exits_130(monkeypatch, capsys, tmp_path, target, argv):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(target, _interrupt)
    assert main(argv) == 130
    printed = capsys.readouterr()
    assert printed.err == "interrupted\n" and "Traceback" not in printed.out


def test_ctrl_c_during_a_real_run_exits_130_without_a_traceback(tmp_path):
    out = tmp_path / "synth"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pipeline", "synth", "--out", str(out), "--count", "4000", "--quiet"]
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 15
        while not (out.is_dir() and any(out.iterdir())):  # the command is writing: main is running
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err == "interrupted\n"


def test_an_interrupted_training_still_leaves_its_process_group(monkeypatch, capsys, tmp_path):
    """A rank of a multi-process gloo world must end through `leave_distributed` (it exits there, past
    the interpreter teardown that can abort it), interrupted or not: it gets the interrupt's status."""
    left = []
    monkeypatch.setattr("stages.train.train", _interrupt)
    monkeypatch.setattr("stages.train.leave_distributed", lambda code: left.append(code) or code)
    assert main(["train", TINY, f"train.out_dir={tmp_path / 'run'}", "--quiet"]) == 130
    assert left == [130] and capsys.readouterr().err == "interrupted\n"
