"""Rendering on an in-process Ray, one actor per stage: the same videos as the local runner."""

from __future__ import annotations

import pytest
import torch

from configs import RenderConfig, load_cascade
from pipeline.ray_cluster import ensure_ray
from pipeline.ray_render import ray_executor
from stages.render import render
from stages.render.output import load_video_tensor, read_json
from tests.render_fixtures import VIDEO_STAGES, build_cascade

PROMPTS = ["a red circle moving right", "a blue square moving up"]


@pytest.fixture(scope="module")
def ray_session():
    """An in-process Ray for this module, shut down afterwards unless it was already running."""
    import ray

    started_here = not ray.is_initialized()
    ensure_ray(num_cpus=2)
    yield
    if started_here:
        ray.shutdown()


def test_ray_render_matches_local(ray_session, tmp_path):
    cascade = load_cascade(build_cascade(tmp_path, VIDEO_STAGES))
    local = render(cascade, PROMPTS, RenderConfig(out_dir=str(tmp_path / "local"), batch_size=2))
    remote = render(
        cascade, PROMPTS, RenderConfig(out_dir=str(tmp_path / "ray"), batch_size=2), executor=ray_executor()
    )
    assert [p["status"] for p in remote.prompts] == ["rendered", "rendered"]
    assert [s["prompts"] for s in remote.stages] == [2, 2, 2]
    files = sorted(p.relative_to(local.out_dir) for p in local.out_dir.glob("*/stages/*.safetensors"))
    assert len(files) == 6
    for rel in files:
        torch.testing.assert_close(
            load_video_tensor(remote.out_dir / rel), load_video_tensor(local.out_dir / rel), atol=1e-5, rtol=0
        )
    for job in PROMPTS:
        sidecar = read_json(next(remote.out_dir.glob(f"*-{job.split()[1]}-*")) / "video.json")
        assert sidecar["output"] == "video.mp4" and len(sidecar["stages"]) == 3
