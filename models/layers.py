"""Building blocks of the diffusion transformer: patches, embeddings, norms, MLP and attention layers.

Dimension names follow DESIGN.md: B, C, T, H, W for pixels; T', H', W' (Tp, Hp, Wp) for the patch grid;
S = H'·W' spatial tokens; D model width; L text tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.attention import Backend, attention
from models.positions import apply_rope

# --------------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------------


def patchify(x: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """(B, C, T, H, W) → (B, T'·H'·W', pt·ph·pw·C) tokens in (T H W) order; exact, no arithmetic."""
    pt, ph, pw = patch
    return rearrange(x, "B C (T pt) (H ph) (W pw) -> B (T H W) (pt ph pw C)", pt=pt, ph=ph, pw=pw)


def unpatchify(tokens: Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> Tensor:
    """Exact inverse of `patchify`: (B, T'·H'·W', pt·ph·pw·C) → (B, C, T, H, W)."""
    (tp, hp, wp), (pt, ph, pw) = grid, patch
    return rearrange(
        tokens, "B (T H W) (pt ph pw C) -> B C (T pt) (H ph) (W pw)", T=tp, H=hp, W=wp, pt=pt, ph=ph, pw=pw
    )


# --------------------------------------------------------------------------------------------------
# Scalar embeddings (diffusion time, frame rate, conditioning-augmentation level)
# --------------------------------------------------------------------------------------------------


def sinusoidal_embedding(values: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(...,) scalars → (..., dim) sin/cos features at geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half
    )
    angles = values.float()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ScalarEmbedder(nn.Module):
    """Embeds a scalar in [0, scale] (time, fps, augmentation level) into the conditioning width D."""

    def __init__(self, dim: int, scale: float, freq_dim: int = 256) -> None:
        super().__init__()
        self.scale = 1000.0 / scale  # map the value range onto ~[0, 1000] like diffusion timesteps
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, values: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(values * self.scale, self.freq_dim).to(self.mlp[0].weight.dtype))


# --------------------------------------------------------------------------------------------------
# Norms, modulation, MLP
# --------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (used on queries and keys)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def modulate(x: Tensor, shift: Tensor, scale: Tensor, frames: int) -> Tensor:
    """adaLN modulation of tokens x (B, T'·S, D) by per-sample (B, 1, D) or per-frame (B, T', D) terms."""
    x = rearrange(x, "B (T S) D -> B T S D", T=frames)
    x = x * (1 + scale[:, :, None, :]) + shift[:, :, None, :]
    return rearrange(x, "B T S D -> B (T S) D")


def gate(x: Tensor, g: Tensor, frames: int) -> Tensor:
    """Multiply tokens x (B, T'·S, D) by a per-sample or per-frame gate (B, 1 | T', D)."""
    return rearrange(
        rearrange(x, "B (T S) D -> B T S D", T=frames) * g[:, :, None, :], "B T S D -> B (T S) D"
    )


class Mlp(nn.Module):
    """Two-layer GELU MLP."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# --------------------------------------------------------------------------------------------------
# Attention layers
# --------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention over the rows of (N, L, D) with RMSNorm on queries and keys."""

    def __init__(self, dim: int, heads: int, zero_out: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        self.out = nn.Linear(dim, dim)
        if zero_out:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(
        self,
        x: Tensor,
        backend: Backend,
        rope: tuple[Tensor, Tensor] | None = None,
        segments: Tensor | None = None,
        max_batch: int = 32768,
    ) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "N L (three H Dh) -> three N L H Dh", three=3, H=self.heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v, backend, segments=segments, max_batch=max_batch)  # (N, L, H, Dh)
        return self.out(rearrange(out, "N L H Dh -> N L (H Dh)"))


class CrossAttention(nn.Module):
    """Queries from the video tokens, keys and values from the text tokens; zero-initialised output."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self, x: Tensor, text: Tensor, text_mask: Tensor, backend: Backend, max_batch: int = 32768
    ) -> Tensor:
        q = rearrange(self.q(x), "N Lq (H Dh) -> N Lq H Dh", H=self.heads)
        k, v = rearrange(self.kv(text), "N L (two H Dh) -> two N L H Dh", two=2, H=self.heads)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attention(q, k, v, backend, key_mask=text_mask, max_batch=max_batch)
        return self.out(rearrange(out, "N Lq H Dh -> N Lq (H Dh)"))
