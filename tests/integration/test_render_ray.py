"""Rendering on an in-process Ray with pools of stage replicas: the one-replica local render's videos
bit for bit, every replica used, and a replica killed with SIGKILL mid-render costs nothing."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from configs import RenderConfig, load_cascade
from pipeline.ray_cluster import ensure_ray
from pipeline.ray_render import ray_executor
from stages.render import render
from stages.render.output import load_video_tensor, read_json, read_video_metadata
from tests.render_fixtures import VIDEO_STAGES, build_cascade

PROMPTS = [f"shape number {i} moving {'left' if i % 2 else 'right'}" for i in range(24)]


@pytest.fixture(scope="module")
def ray_session():
    """An in-process Ray for this module, shut down afterwards unless it was already running."""
    import ray

    started_here = not ray.is_initialized()
    ensure_ray(num_cpus=2)
    yield
    if started_here:
        ray.shutdown()


def _kill_one_ssr_replica(out, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the process that wrote the first ssr output, once two exist (mid-render)."""
    while not stop.is_set():
        files = sorted(out.glob("*/stages/02-ssr.safetensors"))
        if len(files) >= 2:
            pid = int(read_video_metadata(files[0])["worker"].rsplit(":", 1)[1])
            killed += [pid, len(list(out.glob("*/video.json")))]
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.02)


def test_replicas_render_the_local_videos_and_survive_a_killed_replica(ray_session, tmp_path):
    cascade = load_cascade(build_cascade(tmp_path, VIDEO_STAGES))
    local = render(cascade, PROMPTS, RenderConfig(out_dir=str(tmp_path / "local"), batch_size=2))
    out = tmp_path / "ray"
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_one_ssr_replica, args=(out, killed, stop), daemon=True)
    killer.start()
    try:
        remote = render(
            cascade,
            PROMPTS,
            RenderConfig(out_dir=str(out), batch_size=2, devices=4, device="cpu"),
            executor=ray_executor(),
        )
    finally:
        stop.set()
        killer.join()
    assert killed and killed[1] < len(PROMPTS), "the replica was not killed mid-render"
    assert [s["replicas"] for s in remote.stages] == [1, 1, 2]  # the tiny ssr costs the most FLOPs
    assert remote.failures == [] and [s["prompts"] for s in remote.stages] == [24, 24, 24]
    assert all(p["status"] == "rendered" for p in remote.prompts)
    files = sorted(p.relative_to(local.out_dir) for p in local.out_dir.glob("*/stages/*.safetensors"))
    assert len(files) == 3 * len(PROMPTS)
    for rel in files:  # fixed batches: bit for bit, whatever replica made them
        assert torch.equal(load_video_tensor(out / rel), load_video_tensor(local.out_dir / rel)), rel
    workers = {
        name: {read_video_metadata(p)["worker"] for p in out.glob(f"*/stages/{name}.safetensors")}
        for name in ("00-base", "01-tsr", "02-ssr")
    }
    assert len(workers["00-base"]) == len(workers["01-tsr"]) == 1
    pids = {int(w.rsplit(":", 1)[1]) for w in workers["02-ssr"]}
    assert killed[0] in pids and len(pids) == 3  # both replicas, and the killed one's restart
    sidecars = [read_json(p) for p in out.glob("*/video.json")]
    assert sorted(s["index"] for s in sidecars) == list(range(len(PROMPTS)))
    assert not list(out.rglob("*.tmp-*"))  # the killed replica's torn write is gone
