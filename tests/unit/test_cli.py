"""The command line and launch.sh front door."""

from __future__ import annotations

import subprocess
from pathlib import Path

from configs import load_config
from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]


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


def test_commands_not_landed_say_so(capsys):
    assert main(["render", "configs/tiny.yaml"]) == 3
    assert "not yet" in capsys.readouterr().err


def test_launch_sh_help_and_demo_placeholder():
    help_text = subprocess.run(
        [ROOT / "launch.sh", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("setup", "test", "demo", "preprocess", "train", "render", "ray-head", "slurm"):
        assert command in help_text
    demo = subprocess.run([ROOT / "launch.sh", "demo"], capture_output=True, text=True)
    assert demo.returncode != 0 and "not yet" in demo.stderr
    bad = subprocess.run([ROOT / "launch.sh", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr
