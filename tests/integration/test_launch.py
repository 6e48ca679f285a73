"""launch.sh, the front door: its help, the demo's plan through it (which runs the installer's up-to-date
check first), and an unknown command."""

from __future__ import annotations

import subprocess

from tests import ROOT


def test_launch_sh_help_and_demo_plan(tmp_path):
    help_text = subprocess.run(
        [ROOT / "launch.sh", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("setup", "test", "demo", "run", "status", "preprocess", "train", "render", "ray-head"):
        assert command in help_text
    demo = subprocess.run(
        [ROOT / "launch.sh", "demo", "--plan", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
    )
    assert demo.returncode == 0, demo.stderr
    stages = ("synth", "preprocess", "train-base", "train-base-distill-10", "train-tsr", "train-ssr")
    stages += ("render", "render-teacher", "report")
    lines = demo.stdout.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("stage"))) + 1 :][: len(stages)]
    assert [line.split()[:2] for line in table] == [[s, "run"] for s in stages]
    bad = subprocess.run([ROOT / "launch.sh", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr
