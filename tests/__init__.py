"""Tessera's tests: unit/<job>/ (fast, CPU, one process) and integration/ (processes, Ray, trainings)."""

import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (configs/, launch.sh)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at this moment, for a server or rendezvous a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
