"""Resumable reading of `http://` and `https://` shards (standard library only).

A shard streamed over HTTP is a long response, and long responses get torn: a load balancer drops the
connection, a socket times out. Silently ending the tar there would lose samples, so a reader counts
the bytes it has delivered and, when the body ends before its `Content-Length` (or a chunked body is
cut, or the connection fails or times out), reconnects with `Range: bytes=OFFSET-`. A `206` whose
`Content-Range` starts at OFFSET continues the body; a server that ignores `Range` (`200`) is read
again from the start and its first OFFSET bytes are skipped. The bytes delivered are the shard's
bytes, exactly once, or the read fails with `ShardReadError` naming the URL and the byte offset.

`RemoteSettings.retries` bounds the reconnections in a row that deliver nothing new, with a doubling
wait between them; every read that delivers bytes resets the count, so a server that drops every
connection after a while still serves the whole shard as long as each connection makes progress.
A client error (HTTP 4xx) fails at once. Nothing is downloaded until the loader reads a shard.
"""

from __future__ import annotations

import http.client
import io
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import IO

MAX_BACKOFF_S = 30.0
"""Ceiling of the wait between two reconnections."""
_SKIP_BLOCK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


@dataclass(frozen=True)
class RemoteSettings:
    """How an `http(s)://` shard is read: socket timeout and reconnection policy."""

    retries: int = 5
    """Reconnections in a row that deliver no new bytes before the read fails."""
    backoff_s: float = 1.0
    """Wait before the first reconnection of a row; doubles with each further one (at most 30 s)."""
    timeout_s: float = 60.0
    """Socket timeout in seconds, for connecting and for each read."""

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError(f"need retries >= 0, backoff_s >= 0 and timeout_s > 0: {self}")


class ShardReadError(OSError):
    """A remote shard could not be read to its end (names the URL and the byte offset reached)."""


def open_http(url: str, settings: RemoteSettings) -> IO[bytes]:
    """A binary stream of the shard at `url` that resumes torn connections (see the module docstring)."""
    return _ResumingReader(url, settings)


class _ResumingReader(io.RawIOBase):
    def __init__(self, url: str, settings: RemoteSettings) -> None:
        super().__init__()
        self.url, self.settings = url, settings
        self.offset = 0
        """Bytes of the shard delivered so far."""
        self.size: int | None = None
        """The shard's length from the first response that states it; None if no response did."""
        self._response: http.client.HTTPResponse | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        failures = 0
        while True:
            try:
                return self._read_some(buffer)
            except ShardReadError:
                raise
            except (OSError, http.client.HTTPException) as error:
                self._disconnect()
                failures += 1
                if failures > self.settings.retries:
                    raise ShardReadError(
                        f"shard {self.url}: read failed at byte {self.offset}{self._of()} after "
                        f"{self.settings.retries} retries: {error or type(error).__name__}"
                    ) from error
                time.sleep(min(self.settings.backoff_s * 2 ** (failures - 1), MAX_BACKOFF_S))

    def close(self) -> None:
        self._disconnect()
        super().close()

    def _read_some(self, buffer: memoryview) -> int:
        if self._response is None:
            self._response = self._connect()
        n = self._response.readinto(buffer)
        if n == 0 and len(buffer) and self.size is not None and self.offset < self.size:
            raise ConnectionError("the connection closed before the end of the body")
        self.offset += n
        return n

    def _connect(self) -> http.client.HTTPResponse:
        headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        try:
            response = urllib.request.urlopen(
                urllib.request.Request(self.url, headers=headers), timeout=self.settings.timeout_s
            )
        except urllib.error.HTTPError as error:
            if error.code < 500:
                raise ShardReadError(f"shard {self.url}: HTTP {error.code} {error.reason}") from None
            raise
        if response.status == 206:
            self._check_range(response)
        else:
            self._note_size(response.length)
            _skip(response, self.offset)  # the server ignored Range: drop what was delivered already
        return response

    def _check_range(self, response: http.client.HTTPResponse) -> None:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None or int(match[1]) != self.offset:
            response.close()
            raise ConnectionError(
                f"asked for bytes {self.offset}-, got Content-Range {response.headers.get('Content-Range')!r}"
            )
        if match[2] != "*":
            self._note_size(int(match[2]))

    def _note_size(self, size: int | None) -> None:
        if size is not None and self.size is not None and size != self.size:
            raise ShardReadError(
                f"shard {self.url}: changed size while being read ({self.size} bytes, now {size})"
            )
        self.size = size if size is not None else self.size

    def _of(self) -> str:
        return "" if self.size is None else f" of {self.size}"

    def _disconnect(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None


def _skip(response: http.client.HTTPResponse, count: int) -> None:
    while count:
        block = response.read(min(count, _SKIP_BLOCK))
        if not block:
            raise ConnectionError("the connection closed while skipping to the resume offset")
        count -= len(block)
