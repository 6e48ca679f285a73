"""Spatial and temporal attention per backend and kernel, forward and forward+backward: ms, TFLOP/s,
GB/s against the device bandwidth, and the share of a temporal block's time spent in layout changes.
Prints tables and writes JSON.

    python bench/attention.py                   # CPU default: width 128, 4 heads, S = 256, T' = 8 16, fp32
    python bench/attention.py --preset h200     # width 1152, 16 heads, S = 1024, T' = 16 32 64, bf16, batch 2

Shapes follow a DiT block (`models/dit.py`): spatial attention runs N = B·T' rows of S tokens, temporal
attention N = B·S rows of T' tokens, both in the (N, L, H, Dh) layout of `models.attention.attention`,
with q, k, v strided views of one qkv projection output as `SelfAttention` makes them. Backends, each
through `models.attention.attention`: xformers (only when importable and on CUDA), sdpa with torch's
choice (`sdpa:auto`) and forced to each kernel with `torch.nn.attention.sdpa_kernel` (flash, cuDNN,
memory-efficient, math; a kernel that refuses the shapes or the device is listed as refused with the
reason torch gives), and the naive float32 reference. The forward runs without autograd; the
forward+backward computes the gradient of the qkv projection output.

Conventions (per call):
- forward FLOPs = 4·N·H·Lq·Lk·Dh (q·kᵀ and p·v, 2 FLOPs per multiply-add); forward+backward = 3.5 × that
  (FlashAttention's convention: the backward is 2.5 forwards, its 5 matmuls counting the recomputation of
  q·kᵀ that fused kernels do). Note `bench/train_step.py` counts 3× forward for MFU (no recomputation):
  at equal time its basis gives 3/3.5 of the TFLOP/s here. Element-wise work (softmax) is not counted.
- bytes (temporal only, the memory-bound case) = the unavoidable traffic: forward reads q, k, v and writes
  out, 4 tensors of N·L·H·Dh elements; the backward reads q, k, v, out, d_out and writes dq, dk, dv, 8 more,
  so forward+backward moves 12 tensors. Kernels that materialize the (L × L) scores (math, naive) move
  more than that; GB/s here is the effective rate of the useful traffic. `bw_%` = GB/s ÷ --bandwidth-gbs
  (default 4800 on CUDA, H200 HBM3e; on a CPU the copy bandwidth measured here, a large tensor clone).
- `vs_best` = the fastest backend's ms ÷ this backend's ms, per shape and pass (the issue wants spatial
  attention within 20 %).

Layout table (temporal, as `DiTBlock.forward` does it): the rearranges "B (T S) D -> (B S) T D" and back,
each timed materialized (`.contiguous()`: where einops returns a view, at B = 1, the block's next Linear
makes the copy instead), the attention call between them (the model's backend, --backend), and the whole
factorized `DiTBlock` (`bench/factorized_vs_full.dit_block`). The issue wants the rearranges ≤ 15 % of
block time; `rearranges_vs_attention_%` = both copies ÷ (both copies + attention).
Not timed: building tensors, the block and its context.
This is a benchmark, never a test: numbers go to docs/PERFORMANCE.md with the machine and the command.
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from factorized_vs_full import dit_block, step_fn
from report import fill_preset, print_table, record_header, sig, time_call, write_record
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from configs import model_config
from models.attention import attention, resolve_backend, xformers_available
from stages.precision import torch_dtype

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"batch": 1, "spatial": 256, "frames": [8, 16], "width": 128, "heads": 4, "dtype": "fp32"},
    "h200": {
        "batch": 2,
        "spatial": 1024,
        "frames": [16, 32, 64],
        "width": 1152,
        "heads": 16,
        "dtype": "bf16",
    },
}
KERNELS = {
    "sdpa:flash": SDPBackend.FLASH_ATTENTION,
    "sdpa:cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa:efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa:math": SDPBackend.MATH,
}
BACKENDS = ["xformers", "sdpa:auto", *KERNELS, "naive"]
FWD_BWD_FLOPS = 3.5  # × forward FLOPs (see the module docstring)
FWD_BWD_TENSORS = 12  # q, k, v, out read/written forward; q, k, v, out, d_out, dq, dk, dv backward


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of cloning a 1 GiB (CUDA) or 256 MiB (CPU) tensor: bytes read + bytes written over time."""
    x = torch.empty((2**30 if device.type == "cuda" else 2**28) // 4, device=device)
    seconds = time_call(x.clone, device, warmup=1, rounds=5)
    return 2 * x.numel() * x.element_size() / seconds / 1e9


def qkv_output(
    n: int, length: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """A qkv projection output (N, L, 3·H·Dh), which `attention_call` splits as SelfAttention does."""
    return torch.randn(n, length, 3 * heads * head_dim, device=device, dtype=dtype)


def attention_call(backend: str, qkv: Tensor, heads: int, backward: bool) -> Callable[[], Any]:
    """A zero-argument call of one attention (+ backward) in `backend` ('sdpa:flash', 'naive', …) on the
    q, k, v views (N, L, H, Dh) of `qkv` (strided, not copied); the backward gives the qkv gradient."""
    model_backend = "sdpa" if backend.startswith("sdpa") else backend
    kernel = KERNELS.get(backend)
    qkv = qkv.detach().requires_grad_(backward)
    grad = torch.randn((*qkv.shape[:2], qkv.shape[2] // 3), device=qkv.device, dtype=qkv.dtype)

    def call() -> Any:
        with sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext():
            q, k, v = rearrange(qkv, "N L (three H Dh) -> three N L H Dh", three=3, H=heads)
            if not backward:
                with torch.no_grad():
                    return attention(q, k, v, model_backend)
            out = attention(q, k, v, model_backend)
            return torch.autograd.grad(out, qkv, grad.view_as(out))

    return call


def layout_call(src: Tensor, pattern: str, backward: bool, **sizes: int) -> Callable[[], Any]:
    """A zero-argument call of one rearrange, materialized (+ its backward, the inverse copy). Where einops
    returns a view (B = 1), the block's next Linear makes the copy instead: the copy is the cost."""
    src = src.detach().requires_grad_(backward)
    grad = torch.randn_like(rearrange(src.detach(), pattern, **sizes).contiguous())

    def call() -> Any:
        out = rearrange(src, pattern, **sizes).contiguous()
        return torch.autograd.grad(out, src, grad) if backward else out

    return call


def unavailable(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run at all on `device`, or None."""
    if backend == "xformers" and not xformers_available():
        return "xformers missing, or without kernels for this torch"
    if backend == "xformers" and device.type != "cuda":
        return f"xformers needs CUDA (device is {device.type})"
    return None


def time_backend(
    backend: str, n: int, length: int, args: argparse.Namespace, device: torch.device, backward: bool
) -> tuple[float | None, str]:
    """(seconds, note): seconds None when the backend is unavailable, refuses the shapes, or runs out of
    memory; the note says why."""
    reason = unavailable(backend, device)
    if reason:
        return None, f"skipped: {reason}"
    qkv = qkv_output(n, length, args.heads, args.width // args.heads, torch_dtype(args.dtype), device)
    call = attention_call(backend, qkv, args.heads, backward)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                call()
            except RuntimeError as err:
                if isinstance(err, torch.OutOfMemoryError):
                    raise
                why = "; ".join(str(w.message).splitlines()[0] for w in caught) or str(err).split(". ")[0]
                return None, f"refused on {device.type}: {why}"
        return time_call(call, device, args.warmup, args.rounds), ""
    except torch.OutOfMemoryError:
        return None, "OOM"
    finally:
        del qkv, call
        if device.type == "cuda":
            torch.cuda.empty_cache()


def attention_rows(
    axis: str, tp: int, args: argparse.Namespace, device: torch.device, bandwidth: float
) -> list[dict]:
    """Rows of one axis (spatial or temporal) at T' = tp: every backend, forward and forward+backward."""
    s, heads, head_dim = args.spatial, args.heads, args.width // args.heads
    n, length = (args.batch * tp, s) if axis == "spatial" else (args.batch * s, tp)
    flops_fwd = 4 * n * heads * length * length * head_dim
    tensor_bytes = n * length * heads * head_dim * torch.finfo(torch_dtype(args.dtype)).bits // 8
    rows = []
    for backward in (False, True):
        flops = flops_fwd * (FWD_BWD_FLOPS if backward else 1)
        moved = tensor_bytes * (FWD_BWD_TENSORS if backward else 4)
        timed = {b: time_backend(b, n, length, args, device, backward) for b in args.backends}
        best = min((t for t, _ in timed.values() if t is not None), default=None)
        for backend, (seconds, note) in timed.items():
            row: dict[str, Any] = {
                "T'": tp,
                "shape": f"{n}×{length}×{heads}×{head_dim}",
                "pass": "fwd+bwd" if backward else "fwd",
                "backend": backend,
                "ms": "-" if seconds is None else round(seconds * 1e3, 3),
                "TFLOPs": "-" if seconds is None else sig(flops / seconds / 1e12),
            }
            if axis == "temporal":
                row["GBs"] = "-" if seconds is None else sig(moved / seconds / 1e9)
                row["bw_%"] = "-" if seconds is None else sig(100 * moved / seconds / 1e9 / bandwidth)
            row["vs_best"] = "-" if seconds is None else round(best / seconds, 3)
            row["note"] = note
            rows.append(row)
    return rows


def layout_rows(tp: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Temporal layout changes vs the attention between them vs the whole factorized block, at T' = tp."""
    dtype, s, heads = torch_dtype(args.dtype), args.spatial, args.heads
    backend = resolve_backend(args.backend, device)
    h = torch.randn(args.batch, tp * s, args.width, device=device, dtype=dtype)  # (B, T'·S, D)
    rows_in = rearrange(h, "B (T S) D -> (B S) T D", T=tp).contiguous()  # (B·S, T', D)
    qkv = qkv_output(args.batch * s, tp, heads, args.width // heads, dtype, device)
    cfg = model_config(
        "tiny", width=args.width, heads=heads, patch_size=[1, 1, 1], attention_backend=args.backend
    )
    hp = max(d for d in range(1, int(s**0.5) + 1) if s % d == 0)  # the squarest H' × W' = S
    block, x, c, ctx = dit_block(cfg, args.batch, (tp, hp, s // hp), args.text_tokens, device, dtype)

    def forward_block() -> Any:
        with torch.no_grad():
            return block(x, c, ctx)

    rows = []
    for backward in (False, True):
        calls = {
            "in": layout_call(h, "B (T S) D -> (B S) T D", backward, T=tp),
            "attn": attention_call(backend, qkv, heads, backward),
            "out": layout_call(rows_in, "(B S) T D -> B (T S) D", backward, B=args.batch),
            "block": step_fn(block, x, c, ctx) if backward else forward_block,
        }
        t = {k: time_call(call, device, args.warmup, args.rounds) for k, call in calls.items()}
        t_in, t_attn, t_out, t_block = t["in"], t["attn"], t["out"], t["block"]
        rows.append(
            {
                "T'": tp,
                "pass": "fwd+bwd" if backward else "fwd",
                "backend": backend,
                "rearrange_in_ms": round(t_in * 1e3, 3),
                "attention_ms": round(t_attn * 1e3, 3),
                "rearrange_out_ms": round(t_out * 1e3, 3),
                "block_ms": round(t_block * 1e3, 3),
                "rearranges_vs_attention_%": round(100 * (t_in + t_out) / (t_in + t_out + t_attn), 1),
                "rearranges_vs_block_%": round(100 * (t_in + t_out) / t_block, 1),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu", help="defaults of the size args")
    parser.add_argument("--frames", type=int, nargs="+", help="T' values (temporal sequence lengths)")
    parser.add_argument("--spatial", type=int, help="S, spatial tokens per frame")
    parser.add_argument("--width", type=int, help="model width D = H·Dh")
    parser.add_argument("--heads", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--dtype", choices=["fp32", "bf16"])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=BACKENDS)
    parser.add_argument("--backend", default="auto", help="model backend of the layout table")
    parser.add_argument("--text-tokens", type=int, default=64, help="cross-attention keys of the block")
    parser.add_argument("--bandwidth-gbs", type=float, help="device bandwidth (4800 CUDA, measured CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/attention.json"))
    args = parser.parse_args()
    fill_preset(args, PRESETS[args.preset])
    device = torch.device(args.device)
    measured = copy_bandwidth(device)
    bandwidth = args.bandwidth_gbs or (4800.0 if device.type == "cuda" else measured)
    print(f"copy bandwidth measured on {device}: {measured:.1f} GB/s; bw_% against {bandwidth:.1f} GB/s")

    tables = {
        axis: [r for tp in args.frames for r in attention_rows(axis, tp, args, device, bandwidth)]
        for axis in ("spatial", "temporal")
    }
    tables["temporal_layout"] = [r for tp in args.frames for r in layout_rows(tp, args, device)]
    for name, rows in tables.items():
        print(f"\n{name} (S = {args.spatial}, D = {args.width}, {args.heads} heads, {args.dtype})")
        print_table(rows)

    record = {
        **record_header(
            "attention",
            device,
            args,
            cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
            xformers=_xformers_version(),
        ),
        "bandwidth_GBs": {"used": bandwidth, "measured_copy": round(measured, 1)},
        "conventions": {"fwd_flops": "4·N·H·Lq·Lk·Dh", "fwd_bwd_flops": FWD_BWD_FLOPS, "fwd_bwd_tensors": 12},
        **tables,
    }
    write_record(args.out, record)


def _xformers_version() -> str | None:
    if not xformers_available():
        return None
    import xformers

    return xformers.__version__


if __name__ == "__main__":
    main()
