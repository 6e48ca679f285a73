"""One attention function with an explicit backend: xformers, torch SDPA, or a naive reference.

Tensors use the (N, L, H, Dh) layout (batch rows, sequence, heads, head dim), which is what a Linear
projection gives after a view and what xformers expects. Two kinds of masking are supported, both as
block structure rather than dense float biases so every backend can run them efficiently:

- `key_mask` (N, Lk) bool: which keys are real (text padding in cross-attention);
- `segments` (N, L) int: self-attention only within tokens of equal id (contiguous runs), used to
  pack independent clips or images along the frame axis (Imagen Video's joint image-video training).

Huge row counts (temporal attention runs B·S short sequences) are split into chunks of at most
`max_batch` rows, because CUDA kernels cap the grid's batch dimension at 65,535.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from configs.schema import AttentionBackend, AttentionKernel

Backend = AttentionKernel
"""A concrete backend (`model.attention_backend` less auto)."""
BACKENDS: tuple[Backend, ...] = get_args(AttentionKernel)


@functools.cache
def xformers_available() -> bool:
    """True when xformers imports with its compiled kernels (it only runs on CUDA tensors). A wheel built
    for another torch or CUDA imports but has none (xformers warns, and every call then fails): 'auto'
    uses SDPA then."""
    if importlib.util.find_spec("xformers") is None:
        return False
    import xformers

    return bool(getattr(xformers, "_has_cpp_library", True))


def resolve_backend(name: str, device: torch.device | str) -> Backend:
    """Turn a configured backend ('auto' included) into a concrete one for tensors on `device`."""
    device = torch.device(device)
    if name == "auto":
        return "xformers" if device.type == "cuda" and xformers_available() else "sdpa"
    if name not in BACKENDS:
        raise ValueError(
            f"attention backend '{name}' unknown; expected one of {', '.join(get_args(AttentionBackend))}"
        )
    if name == "xformers" and (device.type != "cuda" or not xformers_available()):
        raise ValueError(
            f"attention backend 'xformers' needs CUDA tensors and xformers built for this torch; device is "
            f"{device}, xformers {'usable' if xformers_available() else 'missing or without its kernels'}"
        )
    return name  # type: ignore[return-value]


def _dense_mask(key_mask: Tensor | None, segments: Tensor | None) -> Tensor | None:
    """Boolean (N, 1, Lq, Lk) mask (True = attend) equivalent to the block structure, or None."""
    if segments is not None:
        return (segments[:, :, None] == segments[:, None, :])[:, None]
    if key_mask is not None:
        return key_mask[:, None, None, :]
    return None


def _naive(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Reference: explicit softmax(q·kᵀ/√d)·v in float32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("nqhd,nkhd->nhqk", q.float(), k.float()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("nhqk,nkhd->nqhd", probs, v.float()).to(q.dtype)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


def _run_lengths(segments: Tensor) -> list[int]:
    """Lengths of the runs of equal ids, row after row (rows never merge)."""
    shifted = segments - segments.min()
    offsets = torch.arange(segments.shape[0], device=segments.device)[:, None] * (int(shifted.max()) + 1)
    _, counts = torch.unique_consecutive((shifted + offsets).flatten(), return_counts=True)
    return counts.tolist()


def _xformers(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, segments: Tensor | None) -> Tensor:
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    n, lq, h, d = q.shape
    if segments is not None:
        bias = BlockDiagonalMask.from_seqlens(_run_lengths(segments))
        out = xops.memory_efficient_attention(
            q.reshape(1, n * lq, h, d), k.reshape(1, n * lq, h, d), v.reshape(1, n * lq, h, d), attn_bias=bias
        )
        return out.reshape(n, lq, h, d)
    if key_mask is not None:
        kv_lens = key_mask.sum(dim=1).tolist()
        bias = BlockDiagonalMask.from_seqlens(q_seqlen=[lq] * n, kv_seqlen=kv_lens)
        out = xops.memory_efficient_attention(
            q.reshape(1, n * lq, h, d), k[key_mask][None], v[key_mask][None], attn_bias=bias
        )
        return out.reshape(n, lq, h, d)
    return xops.memory_efficient_attention(q, k, v)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    backend: Backend,
    *,
    key_mask: Tensor | None = None,
    segments: Tensor | None = None,
    max_batch: int = 32768,
) -> Tensor:
    """Scaled dot-product attention of q (N, Lq, H, Dh) over k, v (N, Lk, H, Dh) → (N, Lq, H, Dh).

    `key_mask` (N, Lk) marks real keys; `segments` (N, L) restricts self-attention to equal ids (given
    as contiguous runs). Each row must keep at least one key. At most one of the two may be given.
    """
    if key_mask is not None and segments is not None:
        raise ValueError("attention: pass key_mask (cross-attention) or segments (self-attention), not both")
    if segments is not None and q.shape[1] != k.shape[1]:
        raise ValueError(f"attention: segments need self-attention, got Lq={q.shape[1]} and Lk={k.shape[1]}")
    n = q.shape[0]
    if n > max_batch:
        chunks = [
            attention(
                q[i : i + max_batch],
                k[i : i + max_batch],
                v[i : i + max_batch],
                backend,
                key_mask=None if key_mask is None else key_mask[i : i + max_batch],
                segments=None if segments is None else segments[i : i + max_batch],
                max_batch=max_batch,
            )
            for i in range(0, n, max_batch)
        ]
        return torch.cat(chunks, dim=0)
    if backend == "xformers":
        return _xformers(q, k, v, key_mask, segments)
    mask = _dense_mask(key_mask, segments)
    if backend == "sdpa":
        return _sdpa(q, k, v, mask)
    if backend == "naive":
        return _naive(q, k, v, mask)
    raise ValueError(f"attention backend '{backend}' unknown; expected one of {', '.join(BACKENDS)}")
