"""Exclusive locks on output folders: one job writes a folder at a time.

Every job that writes a folder holds `folder_lock(folder, job)` for as long as it writes there:
preprocess (`preprocess.out`), render and upscale (`--out`), synth (`--out`), a training (rank 0, on
`train.out_dir`) and a pipeline run (its run directory). A second job on the same folder is refused
with `FolderInUse`, naming the holder, before it writes anything, so it can neither delete the first
job's in-flight files (`stages.atomic.remove_leftovers`) nor interleave its outputs with them.

The lock is the file `{folder}/.tessera-lock`, held with `flock` on an open handle: the kernel drops it
when the holder exits, however it exits (kill -9 included), so a dead job never blocks the next one.
The file's text names the holder (pid, host, job, start time). A job that finishes removes the file;
one that dies leaves it behind unheld, and the next job reports that stale lock and takes it over. On
Linux NFS, `flock` is carried by the server's byte-range locks, so jobs on different hosts sharing a
folder exclude each other too.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".tessera-lock"


class FolderInUse(RuntimeError):
    """Another live job holds the folder's lock."""


def check_output_folder(path: str | os.PathLike, name: str = "") -> None:
    """ValueError when the folder `path` cannot be made because it, or a folder above it, is a file; the
    message starts with `name` (the option or config field giving the path) when given. Commands call
    it before any work; `folder_lock` calls it too."""
    path = Path(path)
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                raise ValueError(f"{name + ': ' if name else ''}{existing} is a file; expected a folder")
            return


def _holder(text: str) -> str:
    """'pid N on HOST (JOB, since TIME)' from a lock file's text, or a fallback for a foreign one."""
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']} ({info['job']}, since {info['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


def _open_locked(path: Path, folder: Path) -> int:
    """A handle on `path` holding its exclusive flock; FolderInUse when a live job holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            os.close(fd)
            raise FolderInUse(
                f"{folder} is in use by {holder}; wait for that job to finish or stop it"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file as we opened it: lock the new one


@contextmanager
def folder_lock(folder: str | os.PathLike, job: str) -> Iterator[Path]:
    """Hold the exclusive lock of `folder` (created if missing) while the body writes there; yields the
    folder. Raises FolderInUse, before anything else is written, when another live job holds it
    (ValueError when `folder` is a file). A lock left by a job that died is reported on stderr and
    taken over."""
    folder = Path(folder)
    check_output_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = _open_locked(path, folder)
    try:
        left = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if left:
            print(
                f"{folder}: taking over a stale lock left by {_holder(left)}, which is no longer running",
                file=sys.stderr,
            )
        mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "job": job,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode(), 0)
        os.fsync(fd)
        yield folder
    finally:
        try:
            path.unlink(missing_ok=True)  # while still held: a job waiting on this file retries the new one
        finally:
            os.close(fd)
