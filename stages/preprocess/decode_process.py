"""Decoding in a child process that can be killed: native decoders (decord is known to) may hang or
crash inside C code, which no Python `try` can catch. One file at a time goes to the child; a file that
takes longer than the timeout, or kills the child, becomes a failure and a fresh child takes over.
Children are also replaced every `recycle_after` files to bound native memory growth.

Children fork from a multiprocessing fork server that has imported the decoders once, so starting or
replacing one costs milliseconds instead of a fresh interpreter's imports (and never forks a parent
that runs threads, as Ray workers do).
"""

from __future__ import annotations

import multiprocessing as mp
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path

from stages.media import Clip, ClipSpec, DecodeError, decode_file
from stages.preprocess.discover import InputItem

DecodeFn = Callable[[Path, ClipSpec], list[Clip]]
PRELOAD = ["__main__", "stages.preprocess.decode_process", "decord"]
"""Modules the fork server imports before it forks decode children. "__main__" matters when the job
runs from a script: without it every child would re-import the script and all it imports (torch)."""


def _context() -> mp.context.BaseContext:
    """The fork-server context with the decoders preloaded (spawn where fork servers do not exist)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


class DecodeFailure(Exception):
    """A file that produced no clips: `stage` (discover, open, probe, decode, image, timeout, crash)."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason = stage, reason


def _decode_item(item: InputItem, spec: ClipSpec, decode_fn: DecodeFn) -> list[Clip]:
    """Decode a file on disk, or a tar member through a temporary file of the same extension."""
    if not item.member:
        return decode_fn(Path(item.path), spec)
    with tarfile.open(item.path) as tar:
        source = tar.extractfile(item.member)
        if source is None:
            raise DecodeError(f"{item.id}: not a regular file in the tar", stage="open")
        suffix = Path(item.member).suffix
        with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
            tmp.write(source.read())
            tmp.flush()
            return decode_fn(Path(tmp.name), spec)


def _serve(conn: Connection, spec: ClipSpec, decode_fn: DecodeFn) -> None:
    """Child loop: receive an item, answer ('ok', clips) or ('error', stage, reason)."""
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        try:
            conn.send(("ok", _decode_item(item, spec, decode_fn)))
        except DecodeError as err:
            conn.send(("error", err.stage, err.reason))
        except Exception as err:  # any Python-level failure of one file stays that file's failure
            conn.send(("error", "decode", f"{type(err).__name__}: {err}"))


class DecodeProcess:
    """Decodes items in a killable child process with a per-file timeout.

    `imap` keeps the next item queued in the child's pipe, so the child decodes it while the caller
    encodes and writes the previous result.
    """

    PREFETCH = 2
    """Items handed to the child ahead of their answers (the one it works on + the next)."""

    def __init__(
        self, spec: ClipSpec, timeout_s: float, recycle_after: int, decode_fn: DecodeFn = decode_file
    ) -> None:
        self.spec = spec
        self.timeout_s = timeout_s
        self.recycle_after = recycle_after
        self.decode_fn = decode_fn
        self._ctx = _context()
        self._proc: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._handled = 0

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_serve, args=(child, self.spec, self.decode_fn), daemon=True)
        self._proc.start()
        child.close()
        self._conn, self._handled = parent, 0

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join()
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def _send(self, queue: deque[list]) -> None:
        """Hand unsent queued items to the child in order, up to its recycling budget."""
        for entry in queue:
            item, sent = entry
            if sent or item.error:
                continue
            if self._handled >= self.recycle_after:
                return
            assert self._conn is not None
            self._conn.send(item)
            self._handled += 1
            entry[1] = True

    def _answer(self, since: float) -> list[Clip] | DecodeFailure:
        """The answer for the oldest item the child holds; a timeout or crash kills the child."""
        assert self._conn is not None and self._proc is not None
        if not self._conn.poll(max(0.0, self.timeout_s - (time.monotonic() - since))):
            self._kill()
            return DecodeFailure(
                "timeout", f"decoding took longer than {self.timeout_s:g}s; the decoder was killed"
            )
        try:
            answer = self._conn.recv()
        except (EOFError, ConnectionError):
            self._proc.join()
            code = self._proc.exitcode
            self._kill()
            how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            return DecodeFailure("crash", f"the decoder process died ({how})")
        return answer[1] if answer[0] == "ok" else DecodeFailure(answer[1], answer[2])

    def imap(self, items: Iterable[InputItem]) -> Iterator[tuple[InputItem, list[Clip] | DecodeFailure]]:
        """(item, clips or DecodeFailure) for each item, in order."""
        source = iter(items)
        queue: deque[list] = deque()  # [item, sent to the child], oldest first
        since = 0.0  # when the child started on the oldest sent item
        while True:
            while len(queue) < self.PREFETCH and (item := next(source, None)) is not None:
                queue.append([item, False])
            if not queue:
                return
            item, sent = queue[0]
            if item.error:
                queue.popleft()
                yield item, DecodeFailure("discover", item.error)
                continue
            if not sent:  # nothing in flight: (re)start the child if needed, then hand it the queue
                if self._proc is None or self._handled >= self.recycle_after:
                    self.close()
                    self._start()
                self._send(queue)
                since = time.monotonic()
            result = self._answer(since)
            queue.popleft()
            since = time.monotonic()
            if self._proc is None:  # killed: what it held goes to the next child
                for entry in queue:
                    entry[1] = False
            else:
                while len(queue) < self.PREFETCH and (nxt := next(source, None)) is not None:
                    queue.append([nxt, False])
                self._send(queue)
            yield item, result

    def decode(self, item: InputItem) -> list[Clip]:
        """Clips of one item; raises DecodeFailure on a decode error, a timeout or a crashed child."""
        ((_, result),) = self.imap([item])
        if isinstance(result, DecodeFailure):
            raise result
        return result

    def close(self) -> None:
        """Stop the child politely (or kill it if it does not answer)."""
        if self._conn is not None and self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(timeout=5)
            except (BrokenPipeError, OSError):
                pass
        self._kill()

    def __enter__(self) -> DecodeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
