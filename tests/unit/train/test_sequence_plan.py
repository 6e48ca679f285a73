"""Sequence parallelism's checks and plan, in one process: bad dims are refused with the numbers, the plan
shows dp × sp and tokens per rank, and its activation estimate agrees with what autograd keeps."""

from __future__ import annotations

import pytest
import torch

from configs import ConfigError, load_config
from configs.validate import check_sequence_parallel
from models.dit import VideoDiT
from stages.train.plan import activation_gib, format_training_plan, saved_tensor_bytes, training_plan
from tests import ROOT


def _cfg(*overrides: str):
    return load_config([ROOT / "configs/tiny.yaml"], list(overrides))


def test_frames_and_positions_must_split_evenly_and_the_message_names_them():
    with pytest.raises(ConfigError, match=r"sequence_parallel = 3: T' = 8 patch frames and S = 256") as err:
        _cfg("parallel.sequence_parallel=3")  # refused at load time
    assert "clips of 8×32×32" in str(err.value) and "nothing is padded" in str(err.value)
    with pytest.raises(ConfigError, match=r"S = 9 spatial tokens \(clips of 8×6×6\)"):
        _cfg("parallel.sequence_parallel=2", "data.height=6", "data.width=6")
    with pytest.raises(ConfigError, match=r"T' = 3 patch frames and S = 64 spatial tokens \(3 packed 16×16"):
        _cfg(
            "parallel.sequence_parallel=2",
            "train.crop=[16,16]",
            "data.image_fraction=0.5",
            "data.images_per_item=3",
        )
    with pytest.raises(ConfigError, match=r"S = 63 spatial tokens \(clips of 8×14×18\)"):  # a bucket
        _cfg(
            "parallel.sequence_parallel=2",
            "preprocess.resize=bucket",
            "preprocess.buckets=[[32,32],[14,18]]",
        )


def test_the_world_must_divide_into_sequence_groups():
    cfg = _cfg("parallel.sequence_parallel=2")
    check_sequence_parallel(cfg, world=4)
    with pytest.raises(ValueError, match=r"= 2 does not divide the world size 3 .*T' = 8, S = 256"):
        check_sequence_parallel(cfg, world=3)


def test_the_plan_shows_the_split():
    cfg = _cfg("parallel.sequence_parallel=2", "parallel.zero_stage=2")
    plan = training_plan(cfg, world_size=8)
    assert (plan["data_parallel"], plan["sequence_parallel"]) == (4, 2)
    assert plan["global_batch"] == 2 * 4  # micro-batch × data-parallel ranks, not × 8
    assert plan["tokens_per_rank"] == plan["tokens_per_sample"] // 2 == 8 * 16 * 16 // 2
    whole = training_plan(_cfg(), world_size=4)
    assert plan["activation_gib_per_device"] == pytest.approx(whole["activation_gib_per_device"] / 2)
    text = format_training_plan(plan)
    assert "8 = 4 data-parallel × 2 sequence-parallel" in text and "1024 per sample (1/2" in text


@pytest.mark.parametrize(
    "overrides",
    [(), ("model.width=128", "model.depth=3", "data.frames=4", "data.height=48", "data.width=48")],
)
def test_the_activation_estimate_matches_what_autograd_keeps(overrides):
    cfg = _cfg(*overrides)
    d = cfg.data
    tokens = d.batch_size * d.frames * (d.height // 2) * (d.width // 2)
    model = VideoDiT(cfg.model)
    x = torch.randn(d.batch_size, 3, d.frames, d.height, d.width)
    text = torch.randn(d.batch_size, 8, cfg.model.text_dim)
    measured = saved_tensor_bytes(model, lambda: model(x, torch.rand(d.batch_size), text=text)) / 2**30
    assert activation_gib(cfg, tokens) == pytest.approx(measured, rel=0.1)
