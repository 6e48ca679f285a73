"""Activation checkpointing applied from outside the model changes neither outputs, gradients nor keys."""

from __future__ import annotations

import copy

import torch

from configs import ParallelConfig, model_config
from models.dit import VideoDiT
from stages.parallelize import apply_activation_checkpointing, parallelize_model


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


def test_parallelize_model_follows_the_config():
    model = VideoDiT(model_config("tiny"))
    parallelize_model(model, ParallelConfig(activation_checkpointing=False))
    assert all(type(b).__name__ == "DiTBlock" for b in model.blocks)
    parallelize_model(model, ParallelConfig(activation_checkpointing=True))
    assert all(type(b).__name__ == "CheckpointWrapper" for b in model.blocks)
