"""Tessera's tests: unit/<job>/ (fast, CPU, one process) and integration/ (processes, Ray, trainings)."""

import os
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (configs/, launch.sh)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at this moment, for a server or rendezvous a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RENDEZVOUS = frozenset({"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"})
"""The launcher variables an in-process training sets; a child process must not inherit them."""


def without_rendezvous() -> dict[str, str]:
    """This process's environment less `RENDEZVOUS`, for a child that starts its own world."""
    return {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
