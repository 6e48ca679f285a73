"""The attention function: backends agree, masks mean what they say, chunking changes nothing."""

from __future__ import annotations

import pytest
import torch

from models.attention import attention, resolve_backend, xformers_available


def _qkv(n: int, lq: int, lk: int, heads: int = 2, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, lq, heads, dim, generator=g)
    k = torch.randn(n, lk, heads, dim, generator=g)
    v = torch.randn(n, lk, heads, dim, generator=g)
    return q, k, v


def _loop_reference(q, k, v, keep):
    """Per row and head: softmax over the kept keys only, written with explicit loops."""
    n, lq, h, d = q.shape
    out = torch.zeros(n, lq, h, d, dtype=torch.float64)
    for i in range(n):
        for j in range(lq):
            for head in range(h):
                keys = [m for m in range(k.shape[1]) if keep(i, j, m)]
                scores = torch.stack([q[i, j, head].double() @ k[i, m, head].double() for m in keys]) / d**0.5
                weights = scores.softmax(0)
                out[i, j, head] = sum(w * v[i, m, head].double() for w, m in zip(weights, keys))
    return out.float()


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
def test_backends_match_loop_reference(backend):
    q, k, v = _qkv(3, 5, 5)
    expected = _loop_reference(q, k, v, lambda i, j, m: True)
    torch.testing.assert_close(attention(q, k, v, backend), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
def test_key_mask_ignores_padding(backend):
    q, k, v = _qkv(3, 4, 6)
    key_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    expected = _loop_reference(q, k, v, lambda i, j, m: bool(key_mask[i, m]))
    torch.testing.assert_close(attention(q, k, v, backend, key_mask=key_mask), expected, atol=1e-5, rtol=1e-5)
    # the padded keys' values must not matter
    k2, v2 = k.clone(), v.clone()
    k2[~key_mask], v2[~key_mask] = 100.0, -100.0
    torch.testing.assert_close(
        attention(q, k2, v2, backend, key_mask=key_mask), attention(q, k, v, backend, key_mask=key_mask)
    )


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
def test_segments_equal_separate_runs(backend):
    q, k, v = _qkv(2, 6, 6)
    segments = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    out = attention(q, k, v, backend, segments=segments)
    expected = _loop_reference(q, k, v, lambda i, j, m: bool(segments[i, j] == segments[i, m]))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # a segment run alone gives the same result as inside the packed sequence
    alone = attention(q[:1, :3], k[:1, :3], v[:1, :3], backend)
    torch.testing.assert_close(out[:1, :3], alone, atol=1e-6, rtol=1e-6)


def test_sdpa_and_naive_agree_on_larger_inputs():
    q, k, v = _qkv(64, 37, 37, heads=4, dim=16, seed=3)
    torch.testing.assert_close(attention(q, k, v, "sdpa"), attention(q, k, v, "naive"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
def test_chunking_changes_nothing(backend):
    q, k, v = _qkv(10, 4, 4)
    segments = torch.tensor([0, 0, 1, 1]).repeat(10, 1)
    full = attention(q, k, v, backend, segments=segments, max_batch=1000)
    chunked = attention(q, k, v, backend, segments=segments, max_batch=3)
    torch.testing.assert_close(chunked, full, atol=0, rtol=0)
    qc, kc, vc = _qkv(7, 3, 5)
    key_mask = torch.rand(7, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    key_mask[:, 0] = True
    torch.testing.assert_close(
        attention(qc, kc, vc, backend, key_mask=key_mask, max_batch=2),
        attention(qc, kc, vc, backend, key_mask=key_mask),
        atol=0,
        rtol=0,
    )


def test_resolve_backend():
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("naive", "cpu") == "naive"
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("flash9", "cpu")
    with pytest.raises(ValueError, match="CUDA"):
        resolve_backend("xformers", "cpu")
    with pytest.raises(ValueError, match="not both"):
        q, k, v = _qkv(1, 2, 2)
        attention(q, k, v, "sdpa", key_mask=torch.ones(1, 2, dtype=torch.bool), segments=torch.zeros(1, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not xformers_available(), reason="needs xformers with kernels for this torch")
def test_xformers_matches_sdpa_bf16():
    device, dtype = torch.device("cuda"), torch.bfloat16
    q, k, v = (t.to(device, dtype) for t in _qkv(70000, 8, 8, heads=4, dim=64, seed=5))
    plain_x = attention(q, k, v, "xformers", max_batch=32768)
    plain_s = attention(q, k, v, "sdpa", max_batch=32768)
    torch.testing.assert_close(plain_x.float(), plain_s.float(), atol=2e-2, rtol=2e-2)
    segments = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3], device=device).repeat(q.shape[0], 1)
    torch.testing.assert_close(
        attention(q, k, v, "xformers", segments=segments).float(),
        attention(q, k, v, "sdpa", segments=segments).float(),
        atol=2e-2,
        rtol=2e-2,
    )
    qc, kc, vc = (t.to(device, dtype) for t in _qkv(16, 128, 24, heads=4, dim=64, seed=6))
    key_mask = torch.arange(24, device=device)[None] < torch.randint(1, 25, (16, 1), device=device)
    torch.testing.assert_close(
        attention(qc, kc, vc, "xformers", key_mask=key_mask).float(),
        attention(qc, kc, vc, "sdpa", key_mask=key_mask).float(),
        atol=2e-2,
        rtol=2e-2,
    )
