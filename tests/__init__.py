"""Tessera's tests: unit/<job>/ (fast, CPU, one process) and integration/ (processes, Ray, trainings)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (configs/, launch.sh)."""
