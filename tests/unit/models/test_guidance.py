"""Guidance tests: CFG batching and combination, oscillating weights, dynamic thresholding."""

from __future__ import annotations

import pytest
import torch

from models.diffusion.guidance import classifier_free_guidance, dynamic_threshold, guidance_scale_at


class TextModel:
    """Toy model whose output depends on x, t and the text unless drop_text says to use the null text."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, drop_text, text, tag="none"):
        self.calls.append({"batch": x.shape[0], "drop_text": drop_text.clone(), "t": t, "tag": tag})
        null = torch.full_like(text, -0.25)
        emb = torch.where(drop_text[:, None], null, text)  # (B', D)
        tt = t.reshape(t.shape[0], 1, -1, 1, 1)
        return torch.tanh(x) * (1 + tt) + emb.mean(1).reshape(-1, 1, 1, 1, 1) * x


def inputs(seed=0, per_frame=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2, 4, 3, 3, generator=g)
    t = torch.rand(3, 4, generator=g) if per_frame else torch.rand(3, generator=g)
    text = torch.randn(3, 8, generator=g)
    return x, t, text


def test_scale_one_is_a_single_plain_call():
    x, t, text = inputs()
    model = TextModel()
    out = classifier_free_guidance(model, x, t, 1.0, text=text)
    assert len(model.calls) == 1 and model.calls[0]["batch"] == 3
    assert not bool(model.calls[0]["drop_text"].any())
    torch.testing.assert_close(out, TextModel()(x, t, torch.zeros(3, dtype=torch.bool), text))


@pytest.mark.parametrize("per_frame", [False, True])
@pytest.mark.parametrize("scale", [0.0, 3.5, 7])
def test_cfg_matches_manual_formula_with_one_doubled_call(per_frame, scale):
    x, t, text = inputs(1, per_frame)
    model = TextModel()
    out = classifier_free_guidance(model, x, t, scale, text=text, tag="keep")
    assert len(model.calls) == 1
    call = model.calls[0]
    assert call["batch"] == 6 and call["tag"] == "keep"  # non-tensor kwargs pass through
    assert call["drop_text"].tolist() == [False] * 3 + [True] * 3
    assert call["t"].shape == (6, *t.shape[1:])

    ref = TextModel()
    cond = ref(x, t, torch.zeros(3, dtype=torch.bool), text)
    uncond = ref(x, t, torch.ones(3, dtype=torch.bool), text)
    torch.testing.assert_close(out, uncond + scale * (cond - uncond))
    assert not torch.allclose(cond, uncond)  # the toy really reads drop_text


def test_cfg_rejects_bad_kwargs():
    x, t, text = inputs()
    with pytest.raises(ValueError, match="'text'"):
        classifier_free_guidance(TextModel(), x, t, 4.0, text=text[:2])
    with pytest.raises(ValueError, match="drop_text"):
        classifier_free_guidance(
            TextModel(), x, t, 4.0, text=text, drop_text=torch.zeros(3, dtype=torch.bool)
        )


def test_constant_schedule():
    assert [guidance_scale_at(i, 6, 7.5) for i in range(6)] == [7.5] * 6


def test_oscillating_schedule_values():
    # Imagen Video: constant high weight first, then alternate high/low for the remaining steps.
    values = [
        guidance_scale_at(i, 10, 15.0, "oscillating", low=1.0, oscillate_fraction=0.5) for i in range(10)
    ]
    assert values == [15.0] * 5 + [1.0, 15.0, 1.0, 15.0, 1.0]
    values = [guidance_scale_at(i, 6, 12.0, "oscillating", low=2.0, oscillate_fraction=1.0) for i in range(6)]
    assert values == [12.0, 2.0] * 3
    values = [guidance_scale_at(i, 4, 12.0, "oscillating", oscillate_fraction=0.0) for i in range(4)]
    assert values == [12.0] * 4


def test_guidance_schedule_errors():
    with pytest.raises(ValueError, match="'linear'"):
        guidance_scale_at(0, 10, 5.0, "linear")
    with pytest.raises(ValueError, match="step_index"):
        guidance_scale_at(10, 10, 5.0)
    with pytest.raises(ValueError, match="oscillate_fraction"):
        guidance_scale_at(0, 10, 5.0, "oscillating", oscillate_fraction=1.5)


def test_dynamic_threshold_hand_computed_example():
    x0 = torch.tensor(
        [
            [0.5, -3.0, 2.0, 1.0],  # |x| sorted 0.5, 1, 2, 3 -> median (q=0.5) = 1.5
            [0.2, -0.9, 0.5, 0.1],  # quantile < 1 -> s = 1 -> unchanged
        ]
    )
    out = dynamic_threshold(x0, percentile=0.5)
    expected = torch.tensor([[0.5 / 1.5, -1.0, 1.0, 1.0 / 1.5], [0.2, -0.9, 0.5, 0.1]])
    torch.testing.assert_close(out, expected)


def test_dynamic_threshold_leaves_in_range_tensors_unchanged():
    x0 = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    assert torch.equal(dynamic_threshold(x0), x0)


def test_dynamic_threshold_matches_torch_quantile_reference():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 2, 3, 5, 7, generator=g) * torch.tensor([0.3, 2.0, 5.0]).reshape(3, 1, 1, 1, 1)
    s = torch.quantile(x0.abs().flatten(1), 0.995, dim=1).clamp(min=1).reshape(3, 1, 1, 1, 1)
    out = dynamic_threshold(x0)
    torch.testing.assert_close(out, torch.clamp(x0, -s, s) / s)
    assert out.shape == x0.shape and float(out.abs().max()) <= 1.0
