"""Config precision names (`parallel.precision`, `render.precision`) as torch dtypes."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(precision: str) -> torch.dtype:
    """The dtype of a precision name: fp32, bf16 or fp16."""
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[precision]
