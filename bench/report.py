"""Shared parts of the benchmarks: timing, the machine's name, an aligned table on stdout and a JSON
record on disk."""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: bench/preprocess.py and bench/loader.py keep their module level
# free of it, because the preprocessing job's decode processes import the script's module.


def sig(value: float, digits: int = 3) -> float:
    """`value` rounded to `digits` significant digits."""
    return float(f"{value:.{digits}g}")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int = 2, rounds: int = 5) -> float:
    """Median seconds per call of `fn`: rounds of back-to-back calls (≥ 20 ms, or one call), synchronized
    only at round ends, so that on CUDA kernel launches overlap as in a training step."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    reps = max(1, math.ceil(0.02 / max(time.perf_counter() - start, 1e-9)))
    times = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / reps)
    return statistics.median(times)


def machine(device: torch.device) -> str:
    """The GPU's name, or the CPU model and torch's thread count."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    name = names[0] if names else platform.processor() or platform.machine()
    return f"{name}, {torch.get_num_threads()} torch threads"


def fill_preset(args: argparse.Namespace, preset: dict[str, Any]) -> None:
    """Give every size argument left unset on the command line its value from `preset`."""
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def record_header(
    benchmark: str, device: torch.device, args: argparse.Namespace, **software: Any
) -> dict[str, Any]:
    """The start of every JSON record: benchmark, date, machine, command, software versions, arguments."""
    import torch

    return {
        "benchmark": benchmark,
        "date": date.today().isoformat(),
        "machine": machine(device),
        "command": " ".join(sys.argv),
        "software": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            **software,
        },
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    """Rows of equal keys as left-aligned columns."""
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths)))


def write_record(path: Path, record: dict[str, Any]) -> None:
    """The benchmark's JSON record (machine, command, date, rows) at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


class PeakRSS:
    """`with PeakRSS() as peak:` samples this process's resident memory every `interval` seconds while
    the block runs; `peak.mib` is the largest sample and `peak.start_mib` the first, in MiB (psutil)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.mib, self.start_mib = interval, 0.0, 0.0

    def __enter__(self) -> PeakRSS:
        import threading

        import psutil

        process = psutil.Process()
        self.start_mib = self.mib = process.memory_info().rss / 2**20
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self.mib = max(self.mib, process.memory_info().rss / 2**20)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
