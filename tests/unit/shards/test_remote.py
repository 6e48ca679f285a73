"""Shard URLs beyond local paths: `pipe:` (with allow_pipe), GOPEN_REWRITE, and `http://` from a real
server on 127.0.0.1 that may tear connections mid-shard (resumed with Range, or by skipping when the
server ignores Range) — the loader yields exactly the batches of the local shards, resumes exactly,
and fails with the URL and byte offset when a server never gets further."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stages.shards.remote import RemoteSettings, ShardReadError
from tests.unit.shards.test_loader import _check_pixels, _loader, _same, _take

FAST = RemoteSettings(retries=3, backoff_s=0.01, timeout_s=2.0)
DROP_AFTER = 5000  # bytes of a response body sent before the socket is closed (a shard is ~30 kB)


class ShardServer(ThreadingHTTPServer):
    """Serves a folder of shards; tears responses after `drop_after` body bytes on the first request of
    each shard (`drop="first"`) or on every request (`drop="every"`); honours Range unless told not."""

    daemon_threads = True

    def __init__(self, folder: Path, drop: str = "never", honour_range: bool = True) -> None:
        super().__init__(("127.0.0.1", 0), _ShardHandler)
        self.folder, self.drop, self.honour_range = folder, drop, honour_range
        self.requests: Counter[str] = Counter()
        self.ranges: list[str] = []
        self.lock = threading.Lock()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class _ShardHandler(BaseHTTPRequestHandler):
    server: ShardServer

    def do_GET(self) -> None:
        path = self.server.folder / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        wanted = self.headers.get("Range")
        with self.server.lock:
            self.server.requests[self.path] += 1
            first = self.server.requests[self.path] == 1
            if wanted:
                self.server.ranges.append(wanted)
        start = int(re.fullmatch(r"bytes=(\d+)-", wanted)[1]) if wanted and self.server.honour_range else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        tear = self.server.drop == "every" or (self.server.drop == "first" and first)
        self.wfile.write(body[start : start + DROP_AFTER] if tear else body[start:])
        if tear:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass


@pytest.fixture
def serve(dataset):
    """`serve(**options)` starts a ShardServer over the dataset's shards; all are stopped and joined."""
    servers: list[tuple[ShardServer, threading.Thread]] = []

    def start(**options) -> ShardServer:
        server = ShardServer(dataset[0] / "shards", **options)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return server

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "shards").glob("*.tar"))


def _eval_pass(source, **kw) -> list:
    return list(_loader(source, image_fraction=0.5, train=False, **kw))


def _assert_same_batches(got: list, want: list) -> None:
    assert len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want))


# ---- pipe: and GOPEN_REWRITE ---------------------------------------------------------------------


def test_pipe_urls_read_the_local_samples_when_allowed(dataset):
    root, frames = dataset
    reference = _eval_pass(root)
    piped = _eval_pass([f"pipe:cat {root / 'shards' / name}" for name in _names(root)], allow_pipe=True)
    _assert_same_batches(piped, reference)
    for batch in piped:
        _check_pixels(batch, frames)


def test_gopen_rewrite_maps_urls_and_a_rewrite_to_pipe_is_refused_without_allow_pipe(dataset, monkeypatch):
    root, _ = dataset
    reference = _eval_pass(root)
    pattern = "fake://bucket/train-{000000..000007}.tar"
    monkeypatch.setenv("GOPEN_REWRITE", f"fake://bucket/={root / 'shards'}/")
    _assert_same_batches(_eval_pass(pattern), reference)

    monkeypatch.setenv("GOPEN_REWRITE", f"fake://bucket/=pipe:cat {root / 'shards'}/")
    with pytest.raises(ValueError, match=r"fake://bucket/train-000000\.tar.*pipe:"):
        _eval_pass(pattern)
    _assert_same_batches(_eval_pass(pattern, allow_pipe=True), reference)


def test_unknown_schemes_and_missing_rewritten_files_are_refused(dataset, monkeypatch):
    with pytest.raises(ValueError, match=r"s3://b/x\.tar.*scheme 's3'.*pipe:"):
        _loader("s3://b/x.tar")
    monkeypatch.setenv("GOPEN_REWRITE", "fake://=/nonexistent/")
    with pytest.raises(ValueError, match=r"fake://x\.tar \(rewritten to /nonexistent/x\.tar\): no such file"):
        _loader("fake://x.tar")


# ---- http:// -------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.integration)])
def test_http_shards_read_the_local_samples(dataset, serve, workers):
    root, frames = dataset
    server = serve()
    reference = _eval_pass(root, num_workers=workers)
    served = _eval_pass([server.url(n) for n in _names(root)], num_workers=workers, remote=FAST)
    _assert_same_batches(served, reference)
    for batch in served:
        _check_pixels(batch, frames)
    assert set(server.requests) == {f"/{n}" for n in _names(root)} and not server.ranges


@pytest.mark.parametrize(
    ("drop", "honour_range"),
    [("first", True), ("every", True), ("first", False)],
    ids=["first", "every", "no-range"],
)
def test_torn_http_responses_resume_to_exactly_the_local_samples(dataset, serve, drop, honour_range):
    root, _ = dataset
    server = serve(drop=drop, honour_range=honour_range)
    reference = _eval_pass(root)
    served = _eval_pass([server.url(n) for n in _names(root)], remote=FAST)
    _assert_same_batches(served, reference)
    assert server.ranges and all(r.startswith("bytes=") for r in server.ranges)  # it did resume
    assert all(count >= 2 for count in server.requests.values())


def test_a_server_that_never_gets_further_fails_naming_the_url_and_offset(dataset, serve):
    root, _ = dataset
    server = serve(drop="every", honour_range=False)  # every retry restarts and tears at the same byte
    url = server.url(_names(root)[0])
    with pytest.raises(
        ShardReadError,
        match=rf"shard {re.escape(url)}: read failed at byte {DROP_AFTER} of \d+ after 3 retries",
    ):
        _eval_pass([url] + [server.url(n) for n in _names(root)[1:]], remote=FAST)
    assert server.requests[f"/{_names(root)[0]}"] == 1 + FAST.retries


def test_a_silent_server_times_out_instead_of_hanging(dataset):
    root, _ = dataset
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/train-000000.tar"
        settings = RemoteSettings(retries=1, backoff_s=0.0, timeout_s=0.2)
        with pytest.raises(
            ShardReadError, match=rf"shard {re.escape(url)}: read failed at byte 0 after 1 retries"
        ):
            _eval_pass([url] + [str(root / "shards" / n) for n in _names(root)[1:]], remote=settings)


def test_client_errors_fail_at_once(dataset, serve):
    root, _ = dataset
    server = serve()
    url = server.url("missing.tar")
    with pytest.raises(ShardReadError, match=rf"shard {re.escape(url)}: HTTP 404"):
        _eval_pass([url] + [server.url(n) for n in _names(root)[1:]], remote=FAST)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.integration)])
def test_http_resume_yields_the_batches_of_an_uninterrupted_local_run(dataset, serve, workers):
    root, _ = dataset
    server = serve(drop="first")
    urls = [server.url(n) for n in _names(root)]
    kw = dict(rank=1, world_size=2, num_workers=workers, image_fraction=0.3, max_pending=3)
    k, m = 7, 20  # as the local resume test: odd k, m crosses epochs
    reference = _take(_loader(root, **kw), k + m)

    first = _loader(urls, remote=FAST, **kw)
    head = _take(first, k)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = _loader(urls, remote=FAST, **kw)
    resumed.load_state_dict(state)
    tail = _take(resumed, m)
    _assert_same_batches(head + tail, reference)
    keys = [(b.position["worker"], b.position["batches"]) for b in head + tail]
    assert len(keys) == len(set(keys))  # no batch twice
    assert max(b.position["video"][0] for b in reference) >= 1


def test_data_shards_takes_a_brace_pattern_of_http_urls(dataset, serve):
    from configs import load_config
    from stages.shards.loader import loader_from_config

    root, _ = dataset
    server = serve()

    def eval_pass(shards: str) -> list:
        cfg = load_config(overrides=[f"data.shards={shards}", "data.image_fraction=0.5"])
        return list(loader_from_config(cfg, rank=0, world_size=1, train=False))

    _assert_same_batches(eval_pass(server.url("train-{000000..000007}.tar")), eval_pass(str(root)))
    assert len(server.requests) == 8


def test_remote_settings_out_of_range_are_refused():
    for bad in (dict(retries=-1), dict(backoff_s=-0.5), dict(timeout_s=0.0)):
        with pytest.raises(ValueError, match=r"need retries >= 0, backoff_s >= 0 and timeout_s > 0"):
            RemoteSettings(**bad)
