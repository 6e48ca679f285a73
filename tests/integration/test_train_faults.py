"""Training that refuses instead of guessing and fails in one line: shards of another geometry, bad
checkpoint files on resume and render, a disk that fills during a checkpoint, and DeepSpeed op-build
locks that a killed build left behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.cli import main
from stages import artifacts
from tests import ROOT
from tests.integration.training_data import GEOMETRY, make_training_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_training_shards(tmp_path_factory.mktemp("train-data"))


def _args(shards: Path | str, out: Path, *extra: str) -> list[str]:
    return [
        "configs/tiny.yaml",
        *GEOMETRY,
        f"data.shards={shards}",
        f"train.out_dir={out}",
        "data.batch_size=2",
        "train.warmup_steps=2",
        "data.image_fraction=0.25",
        *extra,
    ]


def _train(*args: str) -> int:
    return main(["train", *args, "--quiet"])


def _metrics_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


# --------------------------------------------------------------------------------------------------
# Shards of another geometry
# --------------------------------------------------------------------------------------------------


def test_shards_of_another_geometry_are_refused_before_any_step(shards, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    smaller = ("data.frames=2", "data.height=4", "data.width=4", "train.steps=1")  # shards: 4×8×8
    patterns = {
        "directory": shards,  # has manifest.json: refused from it
        "brace pattern": f"{shards}/shards/train-{{000000..000011}}.tar",  # no manifest: the first batch
    }
    for name, source in patterns.items():
        out = tmp_path / name.replace(" ", "_")
        assert _train(*_args(source, out, *smaller)) == 2, name
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1, error
        assert re.search(r"is [14]×8×8 \(frames×height×width\), but the run trains at 2×4×4", error), error
        assert "data.reduce=true" in error and "data.frames/height/width" in error, error
        assert _metrics_lines(out) == 0 and not artifacts.committed(out), name
    reduced = tmp_path / "reduced"
    assert _train(*_args(shards, reduced, *smaller, "data.reduce=true")) == 0
    assert [d.name for d in artifacts.committed(reduced)] == ["step_00000001"]
