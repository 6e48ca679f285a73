"""Activation checkpointing and regional torch.compile applied from outside the model change neither
outputs, gradients nor keys; the DeepSpeed config and learning-rate schedule follow the run config."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from configs import ParallelConfig, load_config, model_config
from models.dit import VideoDiT
from stages.train.parallelize import (
    apply_activation_checkpointing,
    apply_compile,
    deepspeed_config,
    lr_factor,
    parallelize_model,
)


def test_activation_checkpointing_is_transparent():
    torch.manual_seed(0)
    model = VideoDiT(model_config("tiny", attention_backend="sdpa"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    wrapped = copy.deepcopy(model)
    assert apply_activation_checkpointing(wrapped) == model.config.depth
    assert type(wrapped.blocks[0]).__name__ == "CheckpointWrapper"
    assert list(wrapped.state_dict()) == list(model.state_dict())

    x, t, text = torch.randn(2, 3, 4, 8, 8), torch.rand(2), torch.randn(2, 3, 64)
    out_plain = model(x, t, text=text)
    out_wrapped = wrapped(x, t, text=text)
    torch.testing.assert_close(out_wrapped, out_plain, atol=0, rtol=0)
    out_plain.square().sum().backward()
    out_wrapped.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    wrapped.load_state_dict(model.state_dict())  # keys line up both ways


@pytest.mark.slow  # inductor's first compile (C++ kernels through gcc) takes ~45 s on 2 cores
def test_compiled_blocks_match_eager():
    """Inductor-compiled blocks give the eager outputs and gradients within float32 rounding.

    `Module.compile` compiles in place, so there is no wrapper type to check; the test asserts that
    every block holds a compiled call, that Dynamo captured a graph with no graph breaks, and that the
    state-dict keys did not change."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = VideoDiT(model_config("tiny", width=32, heads=2, depth=2, text_dim=16, attention_backend="sdpa"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # the zero-initialised gates and output layers too
    compiled = copy.deepcopy(model)
    assert apply_compile(compiled) == model.config.depth
    assert all(block._compiled_call_impl is not None for block in compiled.blocks)
    assert all(block._compiled_call_impl is None for block in model.blocks)
    assert list(compiled.state_dict()) == list(model.state_dict())

    x, t, text = torch.randn(2, 3, 4, 8, 8), torch.rand(2), torch.randn(2, 3, 16)
    out_eager = model(x, t, text=text)
    out_compiled = compiled(x, t, text=text)
    assert counters["stats"]["unique_graphs"] >= 1, "the blocks ran without being compiled"
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(out_compiled, out_eager, atol=1e-5, rtol=1e-5)
    out_eager.square().sum().backward()
    out_compiled.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_parallelize_model_follows_the_config():
    model = VideoDiT(model_config("tiny"))
    parallelize_model(model, ParallelConfig(activation_checkpointing=False))
    assert all(type(b).__name__ == "DiTBlock" for b in model.blocks)
    parallelize_model(model, ParallelConfig(activation_checkpointing=True))
    assert all(type(b).__name__ == "CheckpointWrapper" for b in model.blocks)
    assert all(b._compiled_call_impl is None for b in model.blocks)
    parallelize_model(model, ParallelConfig(), compile_blocks=True)  # compiles lazily: no compile here
    assert all(b._compiled_call_impl is not None for b in model.blocks)


def _run(*overrides):
    return load_config(overrides=["data.batch_size=3", "parallel.grad_accum=2", *overrides])


def test_deepspeed_config_follows_the_run_config():
    ds = deepspeed_config(
        _run("parallel.zero_stage=3", "parallel.precision=bf16", "parallel.offload_optimizer=true"), 4
    )
    assert (
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
        ds["train_batch_size"],
    ) == (
        3,
        2,
        24,
    )
    assert ds["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": False},
    }
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["type"] == "AdamW" and ds["gradient_clipping"] == 1.0


def test_without_cuda_the_optimizer_is_torch_adamw_which_needs_no_op_build(tmp_path):
    assert deepspeed_config(_run(), 1, cuda=False)["optimizer"]["params"]["torch_adam"] is True
    assert "torch_adam" not in deepspeed_config(_run(), 1, cuda=True)["optimizer"]["params"]
    assert deepspeed_config(_run(), 1)["optimizer"]["params"]["torch_adam"] is True  # this CPU machine
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}))
    user = deepspeed_config(_run(f"parallel.deepspeed_config={path}"), 1, cuda=False)
    assert user["optimizer"] == {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}
    path.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"torch_adam": False}}}))
    explicit = deepspeed_config(_run(f"parallel.deepspeed_config={path}"), 1, cuda=False)
    assert explicit["optimizer"]["params"] == {"torch_adam": False}  # the user's choice stands


def test_a_user_deepspeed_json_must_agree_with_the_run_config(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps({"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 0}, "x": 1})
    )
    merged = deepspeed_config(_run(f"parallel.deepspeed_config={path}"), 2)
    assert merged["x"] == 1 and merged["train_batch_size"] == 12  # the user's extra keys survive
    for bad, message in [
        (
            {"train_micro_batch_size_per_gpu": 4},
            r"train_micro_batch_size_per_gpu = 4 disagrees .*data\.batch_size = 3",
        ),
        ({"train_batch_size": 8}, r"train_batch_size = 8 disagrees"),
        (
            {"gradient_accumulation_steps": 1},
            r"gradient_accumulation_steps = 1 disagrees .*parallel\.grad_accum = 2",
        ),
        ({"zero_optimization": {"stage": 2}}, r"stage = 2 disagrees with parallel\.zero_stage = 0"),
        ({"bf16": {"enabled": True}}, r"bf16\.enabled = True disagrees with parallel\.precision = fp32"),
    ]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message) as err:
            deepspeed_config(_run(f"parallel.deepspeed_config={path}"), 2)
        assert str(path) in str(err.value)


def test_lr_schedule_warms_up_then_decays_to_zero():
    assert [lr_factor(s, 4, 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert (
        lr_factor(4, 4, 12) == 1.0 and abs(lr_factor(8, 4, 12) - 0.5) < 1e-12 and lr_factor(12, 4, 12) == 0.0
    )
