"""A folder lock held by another process, as a second job on the same folder would meet it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests import ROOT

_HOLD = """
import sys, time
from stages.folder_lock import folder_lock
with folder_lock(sys.argv[1], "holder"):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_in_child(folder: Path) -> subprocess.Popen:
    """A child process holding `folder`'s lock (job "holder") until it is killed; the caller kills it."""
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(folder)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


@contextmanager
def held_by_another_process(folder: Path) -> Iterator[int]:
    """While open, another live process holds `folder`'s lock; yields its pid."""
    child = hold_in_child(folder)
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait()
