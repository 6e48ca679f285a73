"""Every job that writes a folder refuses one another live job holds, before it writes anything."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from configs import SynthConfig
from pipeline.cli import main
from stages.folder_lock import LOCK_NAME, FolderInUse
from stages.synth import run_synth
from tests import ROOT, without_rendezvous
from tests.folder_locks import held_by_another_process
from tests.integration.training_data import GEOMETRY, make_training_shards
from tests.render_fixtures import VIDEO_STAGES, build_cascade


def _refused(capsys, pid: int) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"is in use by pid {pid} on " in err, err


def test_preprocess_refuses_a_folder_in_use_and_leaves_the_other_jobs_files(tmp_path, capsys):
    run_synth(tmp_path / "in", SynthConfig(count=2, frames=4, size=16, fps=8.0), progress=False)
    out = tmp_path / "out"
    in_flight = out / "shards" / "train-000000.tar.tmp-4242-7"  # the holder's half-written shard
    in_flight.parent.mkdir(parents=True)
    in_flight.write_bytes(b"partial")
    args = ["preprocess", str(tmp_path / "in"), "--out", str(out), *GEOMETRY, "--local", "--quiet"]
    with held_by_another_process(out) as pid:
        assert main(args) == 2
        _refused(capsys, pid)
        assert in_flight.exists() and not (out / "manifest.json").exists()
    assert main(args) == 0  # the holder is gone: the job runs, and cleans up what the holder left
    assert (out / "manifest.json").exists() and not in_flight.exists() and not (out / LOCK_NAME).exists()


def test_render_refuses_a_folder_in_use(tmp_path, capsys):
    cascade = build_cascade(tmp_path / "cascade", VIDEO_STAGES)
    out = tmp_path / "renders"
    args = ["render", "--cascade", str(cascade), "--prompt", "a cat", "--out", str(out), "--local", "--quiet"]
    with held_by_another_process(out) as pid:
        assert main(args) == 2
        _refused(capsys, pid)
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]
    assert main(args) == 0 and (out / "0000-a-cat" / "video.mp4").is_file()


def test_synth_refuses_a_folder_in_use(tmp_path, capsys):
    with held_by_another_process(tmp_path) as pid:
        assert main(["synth", "--out", str(tmp_path), "--count", "2", "--size", "32", "--quiet"]) == 2
        _refused(capsys, pid)
        assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]


def test_a_second_pipeline_run_is_refused_before_it_writes_its_config_or_starts_ray(
    tmp_path, capsys, monkeypatch
):
    from pipeline.job import PipelineJob

    started = []
    monkeypatch.setattr(PipelineJob, "start_ray", lambda job, plan: started.append(plan))
    run = tmp_path / "run"
    demo = str(ROOT / "configs" / "pipeline" / "demo.yaml")
    with held_by_another_process(run) as pid:
        assert main(["run", demo, "--out", str(run), "--plan"]) == 0  # the plan only reads
        capsys.readouterr()
        assert main(["run", demo, "--out", str(run), "--quiet"]) == 2
        _refused(capsys, pid)
        assert [p.name for p in run.iterdir()] == [LOCK_NAME] and not started


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_training_shards(tmp_path_factory.mktemp("lock-data"))


def test_training_refuses_an_out_dir_in_use(shards, tmp_path):
    from configs import load_config
    from stages.train import train

    out = tmp_path / "train"
    cfg = load_config(
        [ROOT / "configs/tiny.yaml"], [*GEOMETRY, f"data.shards={shards}", f"train.out_dir={out}"]
    )
    with held_by_another_process(out) as pid, pytest.raises(FolderInUse, match=f"in use by pid {pid}"):
        train(cfg, progress=False)
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]


def test_every_rank_of_a_two_process_training_refuses_an_out_dir_in_use(shards, tmp_path):
    out = tmp_path / "train"
    args = [*GEOMETRY, f"data.shards={shards}", f"train.out_dir={out}", "--quiet"]
    env = without_rendezvous()
    with held_by_another_process(out) as pid:
        proc = subprocess.run(
            [str(ROOT / "launch.sh"), "train", "configs/tiny.yaml", *args],
            cwd=ROOT,
            env={**env, "NPROC_PER_NODE": "2", "MASTER_PORT": "29650", "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode != 0
    refusals = [line for line in proc.stderr.splitlines() if f"is in use by pid {pid}" in line]
    assert len(refusals) == 2, proc.stderr[-3000:]  # rank 0 and rank 1 each say why
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]


def test_training_refuses_an_out_dir_that_is_a_file(shards, tmp_path):
    from configs import load_config
    from stages.train import train

    target = tmp_path / "notes.txt"
    target.write_text("mine")
    cfg = load_config(
        [ROOT / "configs/tiny.yaml"], [*GEOMETRY, f"data.shards={shards}", f"train.out_dir={target}"]
    )
    with pytest.raises(ValueError, match=f"train.out_dir: {target} is a file; expected a folder"):
        train(cfg, progress=False)
    assert target.read_text() == "mine"
