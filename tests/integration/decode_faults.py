"""Decode functions that misbehave like native decoders do, for the killable-process tests.

They live in an importable module (not a test file) because the decode process is spawned and must
import its target by name.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from stages.media.clips import ClipSpec
from stages.media.decode import Clip, decode_file


def misbehaving_decode(path: Path, spec: ClipSpec) -> list[Clip]:
    """Hang on 'hang*', die by SIGSEGV-like abort on 'crash*', report its pid on 'pid*', else decode."""
    name = Path(path).name
    if name.startswith("hang"):
        time.sleep(3600)
    if name.startswith("crash"):
        os.abort()
    if name.startswith("pid"):
        raise ValueError(f"pid={os.getpid()}")
    return decode_file(path, spec)
