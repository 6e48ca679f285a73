"""Model size presets, from `tiny` (CPU tests) to `XL` (the DiT-XL shape: width 1152, depth 28, 16 heads).

A preset only fills width/depth/heads underneath the user's own values; see `configs.loader`.
"""

from __future__ import annotations

MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"width": 64, "depth": 2, "heads": 4},
    "S": {"width": 384, "depth": 12, "heads": 6},
    "B": {"width": 768, "depth": 12, "heads": 12},
    "L": {"width": 1024, "depth": 24, "heads": 16},
    "XL": {"width": 1152, "depth": 28, "heads": 16},
}
