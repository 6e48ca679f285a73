"""The shard set the loader tests read: 8 real shards of videos (two shapes) and images."""

from __future__ import annotations

import numpy as np
import pytest

from stages.shards import encode_sample, write_shard

SHARDS, PER_SHARD = 8, 6
VIDEO_SHAPES = [(4, 8, 8), (4, 8, 12)]


def _kind_and_shape(j: int) -> tuple[str, tuple[int, int, int]]:
    return ("image", (1, 8, 8)) if j % 3 == 2 else ("video", VIDEO_SHAPES[j % 2])


@pytest.fixture(scope="module", params=["none", "zstd"])
def dataset(tmp_path_factory, request):
    """8 shards × 6 samples: videos of two shapes and 8×8 images, raw or zstd-compressed (every loader
    test runs on both); returns (dir, {key: (T, H, W, 3)})."""
    root = tmp_path_factory.mktemp("data")
    (root / "shards").mkdir()
    rng = np.random.default_rng(0)
    frames = {}
    for i in range(SHARDS):
        samples = []
        for j in range(PER_SHARD):
            key = f"s{i}_{j}"
            kind, (t, h, w) = _kind_and_shape(j)
            frames[key] = rng.integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)
            meta = {
                "kind": kind,
                "fps": 8.0 if kind == "video" else 0.0,
                "source": f"src/{key}.mp4",
                "start_s": 0.0,
                "end_s": 0.5,
                "caption": f"caption {key}",
                "decoder": "pyav",
            }
            patch = (2, 4, 4) if kind == "video" else (1, 2, 2)
            samples.append((key, encode_sample(key, frames[key], patch, meta, compression=request.param)))
        write_shard(root / "shards" / f"train-{i:06d}.tar", samples)
    return root, frames
