"""The synthetic captioned dataset of the demo and the tests (`run_synth`: coloured shapes moving across a
plain background), and the check that reads a video of that vocabulary back (`describe`, `judge`)."""

from stages.synth.check import Description, compare, describe, judge, largest_blob, parse_caption
from stages.synth.make import (
    BACKGROUND,
    COLORS,
    DIRECTIONS,
    SHAPES,
    SynthSummary,
    plan_items,
    render_video,
    run_synth,
)

__all__ = [
    "BACKGROUND",
    "COLORS",
    "DIRECTIONS",
    "SHAPES",
    "Description",
    "SynthSummary",
    "compare",
    "describe",
    "judge",
    "largest_blob",
    "parse_caption",
    "plan_items",
    "render_video",
    "run_synth",
]
