"""A DiT block equals a naive reference written with explicit loops over frames and spatial positions.

The reference shares only the weights with the model: projections are applied token by token, rotary
positions are rebuilt from complex numbers, and attention is an explicit softmax per query and head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from configs import model_config
from models.dit import DiTBlock, VideoDiT

THETA = 10000.0


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _rmsnorm(x, weight, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(vec, angles):
    """Rotate adjacent pairs of `vec` (Dh,) by `angles` (Dh/2,) using complex multiplication."""
    pairs = torch.view_as_complex(vec.double().reshape(-1, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).reshape(-1)


def _freqs(pairs):
    return THETA ** (-torch.arange(pairs, dtype=torch.float64) / pairs)


def _attend(queries, keys, values):
    """queries (Lq, Dh), keys/values (Lk, Dh): explicit softmax attention."""
    out = []
    for q in queries:
        scores = torch.stack([q @ k for k in keys]) / math.sqrt(q.shape[0])
        w = scores.softmax(0)
        out.append(sum(wi * v for wi, v in zip(w, values)))
    return torch.stack(out)


def _self_attention(attn, seq, angles):
    """attn: a SelfAttention module; seq (L, D); angles[i] (Dh/2,) rotary angles of token i."""
    heads = attn.heads
    dim = seq.shape[-1]
    dh = dim // heads
    w, b = attn.qkv.weight.double(), attn.qkv.bias.double()
    qkv = [w @ tok + b for tok in seq]  # L × (3D,)
    out_heads = []
    for h in range(heads):
        q = torch.stack(
            [
                _rotate(_rmsnorm(v[h * dh : (h + 1) * dh], attn.q_norm.weight.double()), a)
                for v, a in zip(qkv, angles)
            ]
        )
        k = torch.stack(
            [
                _rotate(_rmsnorm(v[dim + h * dh : dim + (h + 1) * dh], attn.k_norm.weight.double()), a)
                for v, a in zip(qkv, angles)
            ]
        )
        vv = torch.stack([v[2 * dim + h * dh : 2 * dim + (h + 1) * dh] for v in qkv])
        out_heads.append(_attend(q, k, vv))
    merged = torch.cat(out_heads, dim=-1)
    return merged @ attn.out.weight.double().T + attn.out.bias.double()


def _cross_attention(attn, seq, text, mask):
    heads = attn.heads
    dim = seq.shape[-1]
    dh = dim // heads
    q_all = seq @ attn.q.weight.double().T + attn.q.bias.double()
    kv = text[mask] @ attn.kv.weight.double().T + attn.kv.bias.double()
    out_heads = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        q = _rmsnorm(q_all[:, sl], attn.q_norm.weight.double())
        k = _rmsnorm(kv[:, sl], attn.k_norm.weight.double())
        v = kv[:, dim + h * dh : dim + (h + 1) * dh]
        out_heads.append(_attend(q, k, v))
    return torch.cat(out_heads, -1) @ attn.out.weight.double().T + attn.out.bias.double()


def _layernorm(x, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def reference_block(block: DiTBlock, x, c, text, mask, grid):
    """x (B, T', S, D) float64; c (B, D); text (B, L, D) projected tokens; mask (B, L)."""
    tp, hp, wp = grid
    dim = x.shape[-1]
    dh = dim // block.spatial_attn.heads
    mods = (F.silu(c) @ block.modulation.weight.double().T + block.modulation.bias.double()).chunk(6, -1)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
    tmods = (
        F.silu(c) @ block.temporal_modulation.weight.double().T + block.temporal_modulation.bias.double()
    ).chunk(2, -1)
    spatial_angles = [
        torch.cat([r * _freqs(dh // 4), col * _freqs(dh // 4)]) for r in range(hp) for col in range(wp)
    ]
    temporal_angles = [t * _freqs(dh // 2) for t in range(tp)]
    out = x.clone()
    for b in range(x.shape[0]):
        for t in range(tp):  # spatial attention: one frame at a time
            h = _layernorm(out[b, t]) * (1 + scale_a[b]) + shift_a[b]
            out[b, t] = out[b, t] + gate_a[b] * _self_attention(block.spatial_attn, h, spatial_angles)
        new = out[b].clone()
        for s in range(hp * wp):  # temporal attention: one spatial position at a time
            h = _layernorm(out[b, :, s]) * (1 + tmods[1][b]) + tmods[0][b]
            new[:, s] = out[b, :, s] + _self_attention(block.temporal_attn, h, temporal_angles)
        out[b] = new
        flat = out[b].reshape(tp * hp * wp, dim)
        ln_c = F.layer_norm(flat, (dim,), block.norm_c.weight.double(), block.norm_c.bias.double(), 1e-6)
        flat = flat + _cross_attention(block.cross_attn, ln_c, text[b], mask[b])
        h = _layernorm(flat) * (1 + scale_m[b]) + shift_m[b]
        mlp = block.mlp
        hidden = F.gelu(h @ mlp.fc1.weight.double().T + mlp.fc1.bias.double(), approximate="tanh")
        flat = flat + gate_m[b] * (hidden @ mlp.fc2.weight.double().T + mlp.fc2.bias.double())
        out[b] = flat.reshape(tp, hp * wp, dim)
    return out


def test_block_equals_loop_reference():
    torch.manual_seed(0)
    cfg = model_config("tiny", width=32, heads=2, attention_backend="sdpa")
    model = VideoDiT(cfg).double()
    _perturb(model)
    block = model.blocks[0]
    batch, grid, length = 2, (3, 2, 3), 4
    tp, hp, wp = grid
    x = torch.randn(batch, tp * hp * wp, cfg.width, dtype=torch.float64)
    c = torch.randn(batch, cfg.width, dtype=torch.float64)
    text = torch.randn(batch, length, cfg.width, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    ctx = model.block_context(
        torch.zeros(batch, 3, 3, 4, 6, dtype=torch.float64),
        grid,
        None,
        torch.zeros(batch, length, cfg.text_dim, dtype=torch.float64),
        mask,
    )
    ctx.text = text  # feed the projected tokens directly, as the reference does
    got = block(x, c[:, None], ctx)
    expected = reference_block(block, x.reshape(batch, tp, hp * wp, cfg.width), c, text, mask, grid)
    torch.testing.assert_close(
        got, expected.reshape(batch, -1, cfg.width), atol=1e-5, rtol=1e-4
    )  # rotary tables are float32
