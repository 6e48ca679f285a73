"""The video diffusion transformer: factorized spatial/temporal attention, cross-attention to text,
adaLN-Zero modulation, in pixel space (Imagen Video is pixel-space).

An image is a video of one frame: with T = 1 temporal attention is bypassed, and an image model
(`temporal_layers: false`) loads into a video model unchanged, because temporal attention's output
projection starts at zero. Independent images (or clips) can be packed along the frame axis with
`segments`; temporal attention then stays inside each segment and is skipped for single frames.

Super-resolution models (kind tsr/ssr) take the upsampled low-resolution video as extra input
channels and the conditioning-augmentation level as extra conditioning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from configs.schema import ModelConfig
from models.attention import Backend, resolve_backend
from models.layers import (
    CrossAttention,
    Mlp,
    ScalarEmbedder,
    SelfAttention,
    gate,
    modulate,
    patchify,
    unpatchify,
)
from models.positions import frame_positions, sincos_table, spatial_rope, temporal_rope
from models.text import TextEmbeddings, pooled
from models.weights import read_weights, save_weights

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"

# --------------------------------------------------------------------------------------------------
# Per-forward context shared by all blocks
# --------------------------------------------------------------------------------------------------


class SequenceSplit(Protocol):
    """A clip's tokens split over `size` ranks (sequence parallelism), applied from outside the model
    (`stages/train/sequence_parallel.py`): each rank holds T'/size whole frames for what runs per token or
    per frame, and switches to S/size spatial positions of every frame for temporal attention."""

    size: int
    rank: int

    def frames_to_positions(self, x: Tensor) -> Tensor:
        """(B, T'/size, S, D) this rank's frames → (B, T', S/size, D) its positions (differentiable)."""
        ...

    def positions_to_frames(self, x: Tensor) -> Tensor:
        """The inverse of `frames_to_positions` (differentiable)."""
        ...

    def gather_frames(self, x: Tensor) -> Tensor:
        """(B, T/size, ...) → (B, T, ...): every rank's frames of a small tensor, in rank order (no grad)."""
        ...


@dataclass
class BlockContext:
    """What every block needs about the current input, computed once per forward."""

    grid: tuple[int, int, int]  # (T', H', W') of this rank's frames: T' / sequence.size under a split
    sequence: SequenceSplit | None  # the token split over ranks, or None
    backend: Backend
    max_batch: int
    spatial_rope: tuple[Tensor, Tensor] | None  # cos, sin (S, Dh/2)
    temporal_rope: tuple[Tensor, Tensor] | None  # cos, sin (T', Dh/2)
    run_temporal: bool  # False for T' = 1 or image models
    temporal_segments: Tensor | None  # (B·S, T') segment ids per temporal row
    temporal_keep: Tensor | None  # (B, T', 1): 0 for frames alone in their segment
    text: Tensor  # (B, L, D) per-sample or (B·T', L, D) per-frame text tokens
    text_mask: Tensor  # (B, L) or (B·T', L) bool
    text_per_frame: bool


# --------------------------------------------------------------------------------------------------
# Block
# --------------------------------------------------------------------------------------------------


class DiTBlock(nn.Module):
    """Spatial self-attention → temporal self-attention → cross-attention → MLP, adaLN-Zero modulated."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dim = cfg.width
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.spatial_attn = SelfAttention(dim, cfg.heads)
        self.temporal = cfg.temporal_layers
        if self.temporal:
            self.norm_t = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.temporal_modulation = nn.Linear(dim, 2 * dim)  # shift, scale
            self.temporal_attn = SelfAttention(dim, cfg.heads, zero_out=True)
            nn.init.zeros_(self.temporal_modulation.weight)
            nn.init.zeros_(self.temporal_modulation.bias)
        self.norm_c = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, cfg.heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.modulation = nn.Linear(dim, 6 * dim)  # adaLN-Zero: shift/scale/gate for attention and MLP
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, c: Tensor, ctx: BlockContext) -> Tensor:
        # x: (B, T'·S, D); c: (B, 1 | T', D)
        tp = ctx.grid[0]
        cs = F.silu(c)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(cs).chunk(6, dim=-1)

        # spatial: every frame's S tokens attend to each other
        h = modulate(self.norm1(x), shift_a, scale_a, tp)
        h = rearrange(h, "B (T S) D -> (B T) S D", T=tp)
        h = self.spatial_attn(h, ctx.backend, rope=ctx.spatial_rope, max_batch=ctx.max_batch)
        h = rearrange(h, "(B T) S D -> B (T S) D", T=tp)
        x = x + gate(h, gate_a, tp)

        # temporal: every spatial position's T' tokens attend to each other
        if self.temporal and ctx.run_temporal:
            shift_t, scale_t = self.temporal_modulation(cs).chunk(2, dim=-1)
            h = modulate(self.norm_t(x), shift_t, scale_t, tp)
            h = rearrange(h, "B (T S) D -> B T S D", T=tp)
            if ctx.sequence is not None:  # this rank's frames → every frame of this rank's positions
                h = ctx.sequence.frames_to_positions(h)  # (B, T'/N, S, D) → (B, T', S/N, D)
            positions = h.shape[2]
            h = rearrange(h, "B T S D -> (B S) T D")
            h = self.temporal_attn(
                h,
                ctx.backend,
                rope=ctx.temporal_rope,
                segments=ctx.temporal_segments,
                max_batch=ctx.max_batch,
            )
            h = rearrange(h, "(B S) T D -> B T S D", S=positions)
            if ctx.sequence is not None:
                h = ctx.sequence.positions_to_frames(h)  # (B, T', S/N, D) → (B, T'/N, S, D)
            h = rearrange(h, "B T S D -> B (T S) D")
            if ctx.temporal_keep is not None:
                h = gate(h, ctx.temporal_keep, tp)
            x = x + h

        # cross-attention to the text tokens (one text per sample, or one per packed frame)
        h = self.norm_c(x)
        if ctx.text_per_frame:
            h = rearrange(h, "B (T S) D -> (B T) S D", T=tp)
            h = self.cross_attn(h, ctx.text, ctx.text_mask, ctx.backend, ctx.max_batch)
            h = rearrange(h, "(B T) S D -> B (T S) D", T=tp)
        else:
            h = self.cross_attn(h, ctx.text, ctx.text_mask, ctx.backend, ctx.max_batch)
        x = x + h

        h = self.mlp(modulate(self.norm2(x), shift_m, scale_m, tp))
        return x + gate(h, gate_m, tp)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def _per_frame(value: Tensor, batch: int, name: str, frames: int) -> Tensor:
    """A per-sample (B,) or per-frame (B, T) tensor as (B, 1) or (B, T) for broadcasting over frames."""
    if value.shape == (batch,):
        return value[:, None]
    if value.shape == (batch, frames):
        return value
    raise ValueError(f"{name}: expected shape ({batch},) or ({batch}, {frames}), got {tuple(value.shape)}")


def _frame_span(frames: int, sequence: SequenceSplit | None) -> tuple[int, int]:
    """(first, every): the index of this rank's first patch frame and the clip's patch frames T', for a
    rank holding `frames` patch frames."""
    if sequence is None:
        return 0, frames
    return sequence.rank * frames, sequence.size * frames


class VideoDiT(nn.Module):
    """Denoises (B, C, T, H, W) videos given diffusion time, text tokens, frame rate (and SR conditioning)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.width
        self.patch = tuple(config.patch_size)
        self.is_sr = config.kind != "base"
        in_channels = config.in_channels * (2 if self.is_sr else 1)
        self.patch_embed = nn.Linear(math.prod(self.patch) * in_channels, dim)
        self.time_embed = ScalarEmbedder(dim, scale=1.0)
        self.fps_embed = ScalarEmbedder(dim, scale=config.max_fps)
        self.aug_embed = ScalarEmbedder(dim, scale=1.0) if self.is_sr else None
        self.text_proj = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.text_pool = nn.Linear(config.text_dim, dim)
        self.null_text = nn.Parameter(torch.randn(config.text_dim) * 0.02)  # learned "no text" token
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(dim, 2 * dim)
        self.final = nn.Linear(dim, math.prod(self.patch) * config.in_channels)
        for layer in (self.final_modulation, self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.guidance_embed = None
        if config.guidance_range:  # a guidance-distilled model: built last, so the other weights init alike
            self.guidance_embed = ScalarEmbedder(dim, scale=config.guidance_range[1])
            nn.init.zeros_(self.guidance_embed.mlp[-1].weight)  # starts as the model it is distilled from
            nn.init.zeros_(self.guidance_embed.mlp[-1].bias)
        self._backends: dict[str, Backend] = {}

    # ---- input checks (before any compute) ----------------------------------------------------------

    def _check_video(self, x: Tensor, name: str = "x") -> tuple[int, int, int]:
        cfg = self.config
        if x.dim() != 5:
            raise ValueError(f"{name}: expected a 5-D tensor (B, C, T, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"{name}: expected {cfg.in_channels} channels (B, {cfg.in_channels}, T, H, W), "
                f"got shape {tuple(x.shape)}"
            )
        sizes = x.shape[2:]
        if any(s % p for s, p in zip(sizes, self.patch)):
            raise ValueError(
                f"{name}: (T, H, W) = {tuple(sizes)} is not divisible by the patch size {self.patch}"
            )
        return tuple(s // p for s, p in zip(sizes, self.patch))  # type: ignore[return-value]

    def _check_text(self, text: Tensor, text_mask: Tensor | None, batch: int, frames: int) -> Tensor:
        dt = self.config.text_dim
        if not (text.dim() == 3 and text.shape[0] == batch) and not (
            text.dim() == 4 and text.shape[:2] == (batch, frames)
        ):
            raise ValueError(
                f"text: expected ({batch}, L, {dt}) or ({batch}, {frames}, L, {dt}), got {tuple(text.shape)}"
            )
        if text.shape[-1] != dt:
            raise ValueError(f"text: expected embedding width {dt} (model.text_dim), got {text.shape[-1]}")
        if text_mask is None:
            return torch.ones(text.shape[:-1], dtype=torch.bool, device=text.device)
        if text_mask.shape != text.shape[:-1]:
            raise ValueError(
                f"text_mask: expected shape {tuple(text.shape[:-1])}, got {tuple(text_mask.shape)}"
            )
        return text_mask.bool()

    def backend_for(self, device: torch.device) -> Backend:
        """The configured attention backend resolved for tensors on `device` (cached per device type)."""
        if device.type not in self._backends:
            self._backends[device.type] = resolve_backend(self.config.attention_backend, device)
        return self._backends[device.type]

    # ---- forward -----------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        text: Tensor,
        text_mask: Tensor | None = None,
        fps: Tensor | None = None,
        drop_text: Tensor | None = None,
        cond: Tensor | None = None,
        cond_aug: Tensor | None = None,
        segments: Tensor | None = None,
        sequence: SequenceSplit | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """Predict the diffusion target for noisy x (B, C, T, H, W) at times t (B,) or per frame (B, T).

        text (B, L, text_dim) [+ text_mask (B, L)] or per frame (B, T, L, text_dim); fps (B,) or (B, T);
        drop_text (B,) or (B, T) bool replaces the text by the learned null embedding (classifier-free
        guidance); cond (B, C, T, H, W) is the upsampled low-resolution video of SR models and cond_aug
        (B,) its augmentation level; segments (B, T) int packs independent clips or images along the frame
        axis (contiguous runs of equal ids). Per-frame inputs need a temporal patch size of 1. guidance (B,)
        is the classifier-free guidance weight of a guidance-distilled model (model.guidance_range), which
        then gives the guided prediction in one pass; other models take none.

        sequence: the clip's tokens split over ranks (`SequenceSplit`). Then x, cond and every per-frame
        input are this rank's T/N frames (frames rank·T/N onwards, N = sequence.size), and so is the output.
        """
        batch, frames = x.shape[0], x.shape[2]
        tp, hp, wp = self._check_video(x)
        if sequence is not None and (hp * wp) % sequence.size:
            raise ValueError(
                f"sequence parallelism over {sequence.size} ranks needs S = H'·W' = {hp}×{wp} divisible by "
                f"{sequence.size}"
            )
        per_frame = t.dim() == 2 or text.dim() == 4 or segments is not None
        if per_frame and self.patch[0] != 1:
            raise ValueError(f"per-frame inputs need patch_size[0] == 1, got patch size {self.patch}")
        t = _per_frame(t, batch, "t", frames)
        text_mask = self._check_text(text, text_mask, batch, frames)
        fps = _per_frame(
            fps if fps is not None else torch.zeros(batch, device=x.device), batch, "fps", frames
        )
        if segments is not None and segments.shape != (batch, frames):
            raise ValueError(f"segments: expected shape ({batch}, {frames}), got {tuple(segments.shape)}")
        if segments is not None and sequence is not None:
            segments = sequence.gather_frames(segments)  # (B, T): temporal attention sees every frame
        if self.is_sr:
            if cond is None or cond_aug is None:
                raise ValueError(f"a {self.config.kind} model needs cond (the upsampled video) and cond_aug")
            self._check_video(cond, "cond")
            if cond.shape != x.shape:
                raise ValueError(f"cond: expected the shape of x {tuple(x.shape)}, got {tuple(cond.shape)}")
            cond_aug = _per_frame(cond_aug, batch, "cond_aug", frames)
        if (guidance is None) != (self.guidance_embed is None):
            raise ValueError(
                "guidance: a guidance-distilled model (model.guidance_range) needs the guidance weight (B,)"
                if guidance is None
                else "guidance: this model was not guidance-distilled (model.guidance_range is empty)"
            )

        # conditioning vector c: (B, 1 | T', D)
        if drop_text is not None:
            text, text_mask = self._drop_text(text, text_mask, drop_text.bool())
        pooled_text = pooled(TextEmbeddings(text, text_mask))  # (B, text_dim) or (B, T', text_dim)
        pooled_text = pooled_text[:, None] if pooled_text.dim() == 2 else pooled_text  # (B, 1 | T', text_dim)
        c = self.time_embed(t) + self.fps_embed(fps) + self.text_pool(pooled_text)
        if self.aug_embed is not None:
            c = c + self.aug_embed(cond_aug)
        if self.guidance_embed is not None:
            c = c + self.guidance_embed(_per_frame(guidance, batch, "guidance", frames))

        # tokens: (B, T'·S, D)
        inp = torch.cat([x, cond], dim=1) if self.is_sr else x
        tokens = self.patch_embed(patchify(inp, self.patch))
        ctx = self.block_context(x, (tp, hp, wp), segments, text, text_mask, sequence)
        if self.config.pos_embed == "sincos":
            first, every = _frame_span(tp, sequence)
            positions = (
                frame_positions(segments) if segments is not None else torch.arange(every, device=x.device)
            )
            positions = positions.expand(batch, every)[:, first : first + tp]  # (B, T'): this rank's frames
            tokens = tokens + sincos_table(positions, hp, wp, self.config.width).to(tokens.dtype)

        for block in self.blocks:
            tokens = block(tokens, c, ctx)

        shift, scale = self.final_modulation(F.silu(c)).chunk(2, dim=-1)
        out = self.final(modulate(self.final_norm(tokens), shift, scale, tp))  # (B, T'·S, pt·ph·pw·C)
        return unpatchify(out, (tp, hp, wp), self.patch)

    def _drop_text(self, text: Tensor, mask: Tensor, drop: Tensor) -> tuple[Tensor, Tensor]:
        """Replace dropped rows by the null embedding: one learned token, the rest masked out."""
        if drop.dim() == 1 and text.dim() == 4:  # one verdict per item, over its per-frame captions
            drop = drop[:, None].expand(text.shape[:2])
        if drop.shape != text.shape[:-2]:
            raise ValueError(f"drop_text: expected shape {tuple(text.shape[:-2])}, got {tuple(drop.shape)}")
        length = text.shape[-2]
        null_tokens = torch.cat([self.null_text[None], self.null_text.new_zeros(length - 1, text.shape[-1])])
        null_mask = torch.arange(length, device=mask.device) == 0
        text = torch.where(drop[..., None, None], null_tokens.to(text.dtype), text)
        mask = torch.where(drop[..., None], null_mask, mask)
        return text, mask

    def block_context(
        self,
        x: Tensor,
        grid: tuple[int, int, int],
        segments: Tensor | None,
        text: Tensor,
        text_mask: Tensor,
        sequence: SequenceSplit | None = None,
    ) -> BlockContext:
        """What every block of a forward pass shares for video x (B, C, T, H, W) of patch grid (T', H', W'):
        backend, RoPE tables, temporal segments and the projected text tokens (text as `forward` takes it).
        Under a `sequence` split, x and grid are this rank's frames and segments (B, T) cover every frame."""
        tp, hp, wp = grid
        first, every = _frame_span(tp, sequence)
        head_dim = self.config.width // self.config.heads
        rope = self.config.pos_embed == "rope"
        run_temporal = self.config.temporal_layers and every > 1
        temporal_segments = keep = None
        if run_temporal and segments is not None:
            rows = hp * wp // (1 if sequence is None else sequence.size)  # spatial positions per rank
            temporal_segments = segments.repeat_interleave(rows, dim=0)  # (B·S/N, T'), rows in (B S) order
            partners = (segments[:, :, None] == segments[:, None, :]).sum(-1)  # (B, T') segment sizes
            keep = (partners > 1).to(x.dtype)[:, first : first + tp, None]  # (B, T'/N, 1)
        tokens = self.text_proj(text)
        per_frame = tokens.dim() == 4
        if per_frame:
            tokens = rearrange(tokens, "B T L D -> (B T) L D")
            text_mask = rearrange(text_mask, "B T L -> (B T) L")
        return BlockContext(
            grid=grid,
            sequence=sequence,
            backend=self.backend_for(x.device),
            max_batch=self.config.attention_max_batch,
            spatial_rope=spatial_rope(hp, wp, head_dim, x.device) if rope else None,
            temporal_rope=temporal_rope(every, head_dim, x.device) if rope and run_temporal else None,
            run_temporal=run_temporal,
            temporal_segments=temporal_segments,
            temporal_keep=keep,
            text=tokens,
            text_mask=text_mask,
            text_per_frame=per_frame,
        )

    # ---- weights -----------------------------------------------------------------------------------

    def load_weights(self, state: dict[str, Tensor]) -> None:
        """Load a state dict; temporal-attention weights may be missing (an image model's weights), and so
        may the guidance input (the weights of the model a guidance-distilled one starts from)."""
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as err:  # a tensor of another shape
            mismatch = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
            raise ValueError(f"weights do not match the model config: {'; '.join(mismatch[:4])}") from err
        not_temporal = [k for k in missing if ".temporal_" not in k and not k.startswith("guidance_embed.")]
        if not_temporal or unexpected:
            raise ValueError(
                f"weights do not match the model config: missing {not_temporal[:8]}, "
                f"unexpected {unexpected[:8]}"
            )

    def save_pretrained(self, directory: str | Path, weights_name: str = WEIGHTS_NAME) -> Path:
        """Write `config.yaml` and safetensors weights into `directory` (`models.weights`); returns the
        weights path."""
        return save_weights(directory, self.config, self.state_dict(), weights_name, CONFIG_NAME)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, weights_name: str = WEIGHTS_NAME, overrides: tuple[str, ...] = ()
    ) -> VideoDiT:
        """Build from `directory/config.yaml` (+ dotted overrides, e.g. 'temporal_layers=true' to turn an
        image model into a video model) and load its safetensors weights (never a pickle)."""
        config, state = read_weights(directory, ModelConfig, weights_name, CONFIG_NAME, overrides)
        model = cls(config)
        try:
            model.load_weights(state)
        except ValueError as err:
            raise ValueError(f"{Path(directory) / weights_name}: {err}") from err
        return model
