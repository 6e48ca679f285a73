"""Atomic files: the one way Tessera puts a file in place, and the one cleanup of what a kill leaves.

Every writer of shards, part records, checkpoint markers, metrics logs, stage records, sidecars, stage
tensors and media goes through `atomic_path`: the bytes go to a temporary sibling
`{name}.tmp-{pid}-{thread}` in the same folder, are fsynced, and the temporary file is renamed over the
target (then the folder is fsynced), so a reader sees the old file or the new one, never a torn one.
On an error the temporary file is removed. A process killed mid-write leaves its temporary file
behind; `remove_leftovers` deletes those once the job that owns the folder knows none of its writers is
alive (the end of a preprocessing job, a render, a training, a pipeline run). That job holds the
folder's lock (`stages.folder_lock`), so no other job's writes are in flight there.

A write that fails because the disk is full raises `NoSpaceLeft`, which says so and names the file,
whatever the writer reported (torch.save only says "unexpected pos"): `reporting_full_disk` is the one
translation, used by `atomic_path` and by the checkpoint writer.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LEFTOVER = re.compile(r".+\.tmp-\d+(-\d+)?")
"""Names of the temporary files `atomic_path` makes (and a kill may leave); `.tmp-{pid}` is the name
earlier versions used."""


def _fsync(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


FULL_BELOW = 1 << 20
"""Bytes free under which a failed write is taken to have failed for want of space."""


class NoSpaceLeft(OSError):
    """A write failed because its filesystem is full; the message says which file."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def _out_of_space(err: BaseException, path: Path) -> bool:
    """Whether `err` (or an error it came from) is ENOSPC, or an I/O-like error (torch's writer raises
    RuntimeError) and the filesystem of `path` is now full."""
    chain: list[BaseException] = []
    seen: BaseException | None = err
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(
        (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)
        for e in chain
    ):
        return True
    free = _free_bytes(path) if isinstance(err, OSError | RuntimeError) else None
    return free is not None and free < FULL_BELOW


@contextmanager
def reporting_full_disk(path: str | os.PathLike) -> Iterator[None]:
    """Turn an error of the writes in the body into `NoSpaceLeft` naming `path` (the file or folder
    being written) when it came from a full disk; any other error passes unchanged."""
    try:
        yield
    except NoSpaceLeft:
        raise
    except Exception as err:
        path = Path(path)
        if not _out_of_space(err, path):
            raise
        free = _free_bytes(path) or 0
        raise NoSpaceLeft(f"no space left on device writing {path} ({free / 2**20:.1f} MB free)") from err


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the temporary path to write `path` through; on success it is fsynced and renamed into place.

    The folder is created if needed. Whatever the body writes (with `open`, PyAV, PIL, safetensors…)
    appears under `path` only once complete; if the body raises, the temporary file is deleted and
    `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_native_id()}")
    try:
        with reporting_full_disk(path):
            yield tmp
            _fsync(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent, directory=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`data` as the whole content of `path`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 `text` as the whole content of `path`, atomically."""
    write_bytes(path, text.encode("utf-8"))


def remove_leftovers(root: str | os.PathLike) -> int:
    """Delete the temporary files of interrupted `atomic_path` writes under `root`; returns how many.

    Call it only under the folder's lock, when no writer of this job is alive: a running writer's file
    would be lost.
    """
    removed = 0
    for path in Path(root).rglob("*.tmp-*"):
        if LEFTOVER.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed
