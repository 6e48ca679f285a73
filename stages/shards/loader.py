"""Training data loader: streams patch shards into same-shape micro-batches that resume exactly.

Per (rank, DataLoader worker) — a *logical worker* g = rank·W + w of G = world_size·W — the stream is

    shards of epoch e (eval: sorted[g::G]; train: permutation(seed, e)[g::G], disjoint across workers)
    → webdataset tar streaming → one sub-stream per kind (videos, images)
    → shuffle buffer seeded by (seed, e, rank, w, kind), drained at the end of the worker's epoch
    → shape buckets (bounded pending samples) → batch of lightweight records
    → kind of the n-th batch drawn from (seed, rank, w, n) with P(images) = image_fraction
    → decode (`stages.shards.format.decode_sample`) only for the batches actually yielded.

Everything is a pure function of (seed, rank, world size, W, shard list) and the per-worker position
{batches, video: [epoch, batch-in-epoch], images: [epoch, batch-in-epoch]}. Every batch carries its
worker's position after it; the main process keeps the latest one per worker plus the last worker
served, which is all `ShardLoader.state_dict` needs. Resuming replays only the current epoch of each
sub-stream, reading the JSON members to rebuild buckets but decoding no patch arrays, and rotates the
worker ids so torch's round-robin continues with the worker that was next.

Resuming at another world size (`ShardLoader.load_resized_state`, `stages/shards/resize.py`): the new
world's workers start over the epochs the old workers were in, skipping every sample the old world had
yielded in them (found by replaying the old world's streams, which are pure functions of its settings),
so within the interrupted pass every sample is seen once. The old worlds are kept in the state
(`earlier`) until a later resize; a resize of a resized world replays both.

Shard sources (docs/SHARDS.md): a directory, a brace pattern or a list of URLs — local paths,
`file://`, `http(s)://` (read by `stages.shards.remote`, which resumes torn responses with `Range`
requests under `RemoteSettings`), `pipe:COMMAND` (e.g. `pipe:aws s3 cp s3://bucket/shard.tar -`) and
webdataset's other schemes, each after webdataset's GOPEN_REWRITE prefix rewriting.

Safety: webdataset's automatic decoding is never used (its default handlers unpickle), samples are
decoded by `decode_sample` (no pickle, header-checked `.npy`), and `pipe:` URLs — which run a shell —
are refused unless `allow_pipe=True`, also where GOPEN_REWRITE produces them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen_schemes, rewrite_url

from configs.schema import RunConfig
from stages.shards import resize
from stages.shards.format import decode_meta, decode_sample, iter_tar_samples
from stages.shards.remote import RemoteSettings, open_http

STREAMS = ("video", "images")
"""Sub-stream names; "images" carries samples of kind "image", packed into video-shaped items."""
_STREAM_KIND = {"video": "video", "images": "image"}
_STREAM_ID = {"video": 0, "images": 1}
_MIX_ID = 2  # seeds the per-batch choice of kind, apart from the two shuffle streams
_HTTP = ("http", "https")  # read by stages.shards.remote (resuming), not by webdataset's curl pipe
STATE_FORMAT = 2
"""2 adds `earlier` (the worlds before a resize); format 1 states load as having none."""

# --------------------------------------------------------------------------------------------------
# Shard lists and safe opening
# --------------------------------------------------------------------------------------------------


def resolve_shards(source: str | os.PathLike | Sequence[str], allow_pipe: bool = False) -> list[str]:
    """Shard URLs from a directory (DIR/shards/*.tar, else DIR/*.tar, sorted), a brace pattern or a list.

    Each URL is checked after webdataset's GOPEN_REWRITE: local shards must exist, the scheme must be
    http(s), pipe or one webdataset opens, and a `pipe:` URL (also one produced by the rewrite) raises
    ValueError unless `allow_pipe` is True.
    """
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        folder = Path(source) / "shards" if (Path(source) / "shards").is_dir() else Path(source)
        urls = sorted(str(p) for p in folder.glob("*.tar"))
        if not urls:
            raise ValueError(f"no shards (*.tar) in {folder}")
    elif isinstance(source, (str, os.PathLike)):
        urls = list(braceexpand.braceexpand(os.fspath(source)))
    else:
        urls = [os.fspath(u) for u in source]
    if not urls:
        raise ValueError("no shard URLs given")
    for url in urls:
        _check_url(url, allow_pipe)
    return urls


def _check_url(url: str, allow_pipe: bool) -> None:
    effective = rewrite_url(url)
    shown = url if effective == url else f"{url} (rewritten to {effective})"
    if not allow_pipe and (url.startswith("pipe:") or effective.startswith("pipe:")):
        raise ValueError(
            f"shard URL {shown!r} runs a shell command (pipe:); pass allow_pipe=True only for trusted configs"
        )
    if effective == "-":
        raise ValueError(f"shard URL {shown!r} (stdin) is not supported")
    scheme = urlparse(effective).scheme
    if scheme in ("", "file"):
        if not Path(_local_path(effective)).is_file():
            raise ValueError(f"shard {shown}: no such file")
    elif scheme not in _HTTP and scheme not in gopen_schemes:
        raise ValueError(
            f"shard URL {shown!r}: unsupported scheme {scheme!r}; use a local path, http(s)://, or "
            "pipe:COMMAND (e.g. 'pipe:aws s3 cp s3://bucket/shard.tar -', with allow_pipe=True)"
        )


def _local_path(url: str) -> str:
    return url2pathname(urlparse(url).path) if urlparse(url).scheme == "file" else url


def _open_url(url: str, allow_pipe: bool, remote: RemoteSettings) -> IO[bytes]:
    _check_url(url, allow_pipe)  # the environment could have changed since construction
    effective = rewrite_url(url)
    scheme = urlparse(effective).scheme
    if scheme in ("", "file"):
        return open(_local_path(effective), "rb")
    if scheme in _HTTP:
        return open_http(effective, remote)
    return gopen_schemes[scheme](effective, "rb")  # pipe:, gs://, ais://, ... (webdataset's openers)


def _expand_shards(
    src: Iterable[dict[str, Any]], allow_pipe: bool, remote: RemoteSettings
) -> Iterator[dict[str, Any]]:
    """webdataset stage: {url} → raw samples {__key__, __url__, suffix: bytes}, strictly grouped."""
    for shard in src:
        with contextlib.closing(_open_url(shard["url"], allow_pipe, remote)) as stream:
            yield from iter_tar_samples(stream, shard["url"])


# --------------------------------------------------------------------------------------------------
# Records, shuffling and shape buckets
# --------------------------------------------------------------------------------------------------


@dataclass
class Record:
    """A sample whose JSON is parsed but whose arrays are still bytes (cheap to hold, skip or drop): what
    the shuffle buffer and the shape buckets hold until a batch is decoded."""

    members: dict[str, Any]
    """The sample's raw tar members (suffix → bytes, plus `__key__` and `__url__`)."""
    meta: dict[str, Any]
    """The sample's parsed JSON metadata (`stages.shards.format.decode_meta`)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """(T, H, W) of the sample: what its shape bucket is keyed by."""
        return self.meta["frames"], self.meta["height"], self.meta["width"]


def record_id(record: Record) -> tuple[str, str]:
    """What tells samples apart across shards: (shard file name, sample key)."""
    return Path(urlparse(record.members["__url__"]).path).name, record.members["__key__"]


def _to_record(raw: dict[str, Any]) -> Record:
    return Record(members=raw, meta=decode_meta(raw))


def _shuffle(items: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Reservoir-style shuffle buffer holding at most `size` items; drains at the end."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            yield _pop_random(buf, rng)
    while buf:
        yield _pop_random(buf, rng)


def _pop_random(buf: list[Any], rng: np.random.Generator) -> Any:
    i = int(rng.integers(len(buf)))
    buf[i], buf[-1] = buf[-1], buf[i]
    return buf.pop()


class Bucketer:
    """Groups records by (T, H, W) so that every batch has one shape; emits full batches, and the largest
    bucket when the pending records hit a bound (memory stays bounded however many shapes a set has).

    `capacity` records make a full batch (batch_size, or batch_size × images_per_item for images). A
    forced (partial) emission of an image bucket keeps whole items: floor(n / item) items, or one
    shorter item of n frames when n < item, so every item of a batch has the same T.
    """

    def __init__(self, capacity: int, item: int, max_pending: int) -> None:
        self.capacity, self.item, self.max_pending = capacity, item, max_pending
        self.pending: dict[tuple[int, int, int], list[Record]] = {}
        self.total = 0

    def add(self, record: Record) -> list[list[Record]]:
        """Hold `record`; returns the batches it completes or forces out (often none)."""
        bucket = self.pending.setdefault(record.shape, [])
        bucket.append(record)
        self.total += 1
        out = []
        if len(bucket) >= self.capacity:
            out.append(self._take(record.shape, self.capacity))
        while self.total >= self.max_pending:
            out.append(self._take_largest())
        return out

    def flush(self) -> Iterator[list[Record]]:
        """Every pending record, largest bucket first (the end of a worker's epoch)."""
        while self.total:
            yield self._take_largest()

    def _take_largest(self) -> list[Record]:
        shape = max(self.pending, key=lambda s: len(self.pending[s]))  # first-inserted among ties
        n = min(len(self.pending[shape]), self.capacity)
        if n >= self.item:
            n -= n % self.item
        return self._take(shape, n)

    def _take(self, shape: tuple[int, int, int], n: int) -> list[Record]:
        bucket = self.pending.pop(shape)
        if len(bucket) > n:
            self.pending[shape] = bucket[n:]
        self.total -= n
        return bucket[:n]


# --------------------------------------------------------------------------------------------------
# The per-worker stream
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamSettings:
    """Everything that determines the batch sequence (recorded in the loader state)."""

    batch_size: int
    rank: int
    world_size: int
    num_workers: int
    seed: int
    image_fraction: float
    shuffle_buffer: int
    train: bool
    images_per_item: int
    max_pending: int
    allow_pipe: bool


def initial_position() -> dict[str, Any]:
    """Position of a worker that has yielded nothing."""
    return {"batches": 0, "video": [0, 0], "images": [0, 0]}


class ShardStream(IterableDataset):
    """IterableDataset of ready batches for one rank; each DataLoader worker streams its own shards.

    Set `start` (positions per logical worker) and `offset` (physical worker p runs logical worker
    (p + offset) % W) before iterating; `ShardLoader` does this for you. `remote` says how `http(s)://`
    shards are read (None: `RemoteSettings()`); it is not part of the loader state (it does not change
    the batches).
    """

    def __init__(
        self, urls: list[str], settings: StreamSettings, remote: RemoteSettings | None = None
    ) -> None:
        super().__init__()
        s = settings
        workers = max(1, s.num_workers)
        if not 0 <= s.rank < s.world_size:
            raise ValueError(f"rank {s.rank} is outside world_size {s.world_size}")
        if min(s.batch_size, s.images_per_item) < 1 or min(s.shuffle_buffer, s.num_workers, s.seed) < 0:
            raise ValueError(
                f"need batch_size, images_per_item >= 1 and shuffle_buffer, num_workers, seed >= 0: {s}"
            )
        if not 0.0 <= s.image_fraction <= 1.0:
            raise ValueError(f"image_fraction must lie in [0, 1], got {s.image_fraction}")
        if len(urls) < s.world_size * workers:
            raise ValueError(
                f"{len(urls)} shards cannot be split disjointly across {s.world_size} ranks × {workers} "
                f"workers = {s.world_size * workers} streams; write more shards or use fewer workers"
            )
        self.urls, self.settings, self.workers = list(urls), settings, workers
        self.remote = remote or RemoteSettings()
        self.streams = self._active_streams()
        if s.max_pending < s.batch_size:
            raise ValueError(f"max_pending {s.max_pending} is below one full batch ({s.batch_size})")
        self.start = [initial_position() for _ in range(workers)]
        self.offset = 0
        self.earlier: list[dict[str, Any]] = []
        """Worlds this run had before a resize (`stages.shards.resize.past_world`): what they yielded in
        the epochs they reached is skipped."""
        self._seen_cache: dict[tuple[str, int], frozenset[tuple[str, str]]] = {}

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        physical, count = (info.id, info.num_workers) if info is not None else (0, 1)
        if count != self.workers:
            raise ValueError(f"ShardStream built for {self.workers} workers runs in {count}")
        logical = (physical + self.offset) % self.workers
        yield from self._worker_batches(logical, self.start[logical])

    # ---- batch sequence of one logical worker ------------------------------------------------------

    def _worker_batches(self, worker: int, start: dict[str, Any]) -> Iterator[Batch]:
        s = self.settings
        streams = {name: self._stream_batches(name, worker, tuple(start[name])) for name in self.streams}
        position = {name: list(start[name]) for name in STREAMS}
        n = start["batches"]
        while streams:
            name = next(iter(streams))
            if len(streams) == 2:
                u = np.random.default_rng([s.seed, _MIX_ID, s.rank, worker, n]).random()
                name = "images" if u < s.image_fraction else "video"
            try:
                epoch, index, records = next(streams[name])
            except StopIteration:
                del streams[name]
                continue
            n += 1
            position[name] = [epoch, index + 1]
            after = {"worker": worker, "batches": n, **{k: list(v) for k, v in position.items()}}
            if name == "video":
                yield _collate_video(records, after)
            else:
                yield _collate_images(records, s.images_per_item, after)

    def _stream_batches(
        self, name: str, worker: int, start: tuple[int, int]
    ) -> Iterator[tuple[int, int, list[Record]]]:
        """(epoch, batch index in epoch, records) of one kind, skipping the first start[1] of start[0]."""
        s = self.settings
        g, total = s.rank * self.workers + worker, s.world_size * self.workers
        empty_limit = 1 if total == 1 else 10 * total
        epoch, skip = start
        empty_epochs = 0
        while True:
            bucketer = Bucketer(self._capacity(name), self._item(name), s.max_pending * self._item(name))
            rng = np.random.default_rng([s.seed, epoch, s.rank, worker, _STREAM_ID[name]])
            records = self._records(self._epoch_urls(epoch, g, total), name)
            done = self.seen_before(name, epoch)
            if done:
                records = (r for r in records if record_id(r) not in done)
            records = _shuffle(records, s.shuffle_buffer, rng)
            index = seen = 0
            for batches in _chain_flush(bucketer, records):
                for batch in batches:
                    seen += len(batch)
                    if epoch != start[0] or index >= skip:
                        yield epoch, index, batch
                    index += 1
            if not s.train:
                return
            empty_epochs = 0 if seen else empty_epochs + 1
            if empty_epochs >= empty_limit:
                raise ValueError(
                    f"rank {s.rank} worker {worker}: no {_STREAM_KIND[name]} samples in {empty_epochs} "
                    f"epochs of its shards; image_fraction={s.image_fraction} needs both kinds"
                )
            epoch += 1

    def seen_before(self, name: str, epoch: int) -> frozenset[tuple[str, str]]:
        """`record_id`s of the samples of kind `name` that the worlds before a resize yielded in their
        `epoch` (empty when none of them reached it)."""
        if (name, epoch) not in self._seen_cache:
            seen: set[tuple[str, str]] = set()
            for index, world in enumerate(self.earlier):
                seen |= self._yielded(world, self.earlier[:index], name, epoch)
            self._seen_cache[(name, epoch)] = frozenset(seen)
        return self._seen_cache[(name, epoch)]

    def _yielded(
        self, world: dict[str, Any], before: list[dict[str, Any]], name: str, epoch: int
    ) -> set[tuple[str, str]]:
        """The samples of kind `name` that the past `world` (whose own past is `before`) yielded in
        `epoch`: each of its logical workers' batches of that epoch up to its saved position."""
        seen: set[tuple[str, str]] = set()
        workers = max(1, world["num_workers"])
        for g, position in enumerate(world["positions"]):
            reached, count = position[name]
            if reached < epoch:
                continue
            rank, worker = divmod(g, workers)
            settings = dataclasses.replace(
                self.settings, rank=rank, world_size=world["world_size"], num_workers=world["num_workers"]
            )
            past = ShardStream(self.urls, settings, self.remote)
            past.earlier = before
            for at, index, batch in past._stream_batches(name, worker, (epoch, 0)):
                if at != epoch or (reached == epoch and index >= count):
                    break
                seen.update(record_id(r) for r in batch)
        return seen

    def _records(self, urls: list[str], name: str) -> Iterator[Record]:
        kind = _STREAM_KIND[name]
        return iter(
            wds.DataPipeline(
                wds.SimpleShardList(urls),
                lambda src: _expand_shards(src, self.settings.allow_pipe, self.remote),
                wds.map(_to_record),
                wds.select(lambda r: r.meta["kind"] == kind),
            )
        )

    def _epoch_urls(self, epoch: int, g: int, total: int) -> list[str]:
        if not self.settings.train:
            return self.urls[g::total]
        order = np.random.default_rng([self.settings.seed, epoch]).permutation(len(self.urls))
        return [self.urls[i] for i in order[g::total]]

    def _active_streams(self) -> list[str]:
        f = self.settings.image_fraction
        if not self.settings.train:
            return list(STREAMS)  # one pass over everything; the fraction only orders the mix
        return [name for name, share in (("video", 1.0 - f), ("images", f)) if share > 0]

    def _item(self, name: str) -> int:
        return self.settings.images_per_item if name == "images" else 1

    def _capacity(self, name: str) -> int:
        return self.settings.batch_size * self._item(name)


def _chain_flush(bucketer: Bucketer, records: Iterable[Record]) -> Iterator[list[list[Record]]]:
    for record in records:
        yield bucketer.add(record)
    yield list(bucketer.flush())


# --------------------------------------------------------------------------------------------------
# Batches and collation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """One same-shape micro-batch as the loader yields it: B clips of T frames (kind "video"), or B items
    of T independent images of one (H, W) packed along the frame axis (kind "images").

    Picklable (DataLoader workers send it to the main process) and pinnable (`ShardLoader(pin_memory=
    True)`: torch's pin-memory thread calls `pin_memory()`). Frozen: a changed batch is a new one
    (`replace`), and whoever holds the old one keeps it as it was.
    """

    x: torch.Tensor
    """float32 (B, C, T, H, W) in [-1, 1]."""
    kind: Literal["video", "images"]
    """"video": each item is one clip; "images": each of an item's T frames is its own still image."""
    captions: list[str] | list[list[str]]
    """B strings (video) or B lists of T strings (images)."""
    keys: list[str] | list[list[str]]
    """The samples' keys, laid out as `captions`: B (video) or B lists of T (images)."""
    fps: torch.Tensor
    """float32 (B,) frame rates (video) or zeros (B, T) (images: 0 marks a still image)."""
    segments: torch.Tensor | None
    """None (video) or int64 (B, T) = arange(T) per item (images: each frame its own segment)."""
    text: torch.Tensor | None
    """Stored text embeddings padded to the longest, float32 (B, L, D) (video) or (B, T, L, D) (images);
    None unless every sample has one (of one width D)."""
    text_mask: torch.Tensor | None
    """bool (B, L) (video) or (B, T, L) (images): True on the real tokens of `text`; None with it."""
    position: dict[str, Any]
    """{"worker", "batches", "video": [epoch, batch], "images": [epoch, batch]}: the producing worker's
    position after this batch, what `ShardLoader.state_dict` is built from."""

    def flat_captions(self) -> list[str]:
        """One caption per clip (B, video) or per image (B·T, item by item, images)."""
        if self.kind == "video":
            return list(self.captions)
        return [caption for item in self.captions for caption in item]

    def replace(self, **changes: Any) -> Batch:
        """A copy of the batch with the given fields replaced."""
        return dataclasses.replace(self, **changes)

    def pin_memory(self) -> Batch:
        """A copy whose tensors are in page-locked memory, for fast asynchronous copies to the GPU."""
        return self.replace(
            x=self.x.pin_memory(),
            fps=self.fps.pin_memory(),
            segments=_pinned(self.segments),
            text=_pinned(self.text),
            text_mask=_pinned(self.text_mask),
        )


def _pinned(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.pin_memory()


def _to_unit(frames: torch.Tensor) -> torch.Tensor:
    return frames.float().div_(127.5).sub_(1.0)  # uint8 [0, 255] → float [-1, 1]


def _collate_video(records: list[Record], position: dict[str, Any]) -> Batch:
    samples = [decode_sample(r.members) for r in records]
    x = _to_unit(torch.stack([s.frames for s in samples]))  # (B, C, T, H, W)
    text, mask = _pad_text([[s.text] for s in samples])
    return Batch(
        x=x,
        kind="video",
        captions=[s.meta["caption"] for s in samples],
        keys=[s.key for s in samples],
        fps=torch.tensor([float(s.meta["fps"]) for s in samples]),  # (B,)
        segments=None,
        text=None if text is None else text[:, 0],  # (B, L, D)
        text_mask=None if mask is None else mask[:, 0],  # (B, L)
        position=position,
    )


def _collate_images(records: list[Record], item: int, position: dict[str, Any]) -> Batch:
    per_item = min(item, len(records))  # the bucketer emits whole items, or one short item
    samples = [decode_sample(r.members) for r in records]
    items = [samples[i : i + per_item] for i in range(0, len(samples), per_item)]
    x = torch.stack([torch.cat([s.frames for s in item], dim=1) for item in items])  # (B, C, T, H, W)
    batch, frames = x.shape[0], x.shape[2]
    text, mask = _pad_text([[s.text for s in item] for item in items])
    return Batch(
        x=_to_unit(x),
        kind="images",
        captions=[[s.meta["caption"] for s in item] for item in items],
        keys=[[s.key for s in item] for item in items],
        fps=torch.zeros(batch, frames),  # (B, T): 0 marks a still image
        segments=torch.arange(frames).expand(batch, frames).clone(),  # (B, T): one segment per image
        text=text,  # (B, T, L, D)
        text_mask=mask,  # (B, T, L)
        position=position,
    )


def _pad_text(groups: list[list[torch.Tensor | None]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Pad per-sample (L, D) embeddings to (B, G, Lmax, D) + mask; None unless every sample has one."""
    flat = [t for group in groups for t in group]
    if any(t is None for t in flat) or len({t.shape[1] for t in flat}) != 1:
        return None, None
    length = max(t.shape[0] for t in flat)
    text = torch.zeros(len(groups), len(groups[0]), length, flat[0].shape[1])
    mask = torch.zeros(len(groups), len(groups[0]), length, dtype=torch.bool)
    for b, group in enumerate(groups):
        for j, t in enumerate(group):
            text[b, j, : t.shape[0]] = t.float()
            mask[b, j, : t.shape[0]] = True
    return text, mask


# --------------------------------------------------------------------------------------------------
# The loader: torch DataLoader + resumable state
# --------------------------------------------------------------------------------------------------


def _identity(batch: Batch) -> Batch:
    return batch


class ShardLoader:
    """Iterable of `Batch`es for one rank, with `state_dict` / `load_state_dict` for exact resume.

    Every batch has one (T, H, W). B may be smaller than batch_size when a shape bucket is flushed
    (end of a worker's epoch, or the pending bound); the last item of an image batch is never shorter
    than the others. Iterating again continues from the current position (a finished eval pass
    starts over). Training iterates forever.
    """

    def __init__(
        self,
        dataset: ShardStream,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        multiprocessing_context: str | None = None,
    ) -> None:
        self.dataset = dataset
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.multiprocessing_context = multiprocessing_context
        self._reset()

    def _reset(self) -> None:
        self._positions = [initial_position() for _ in range(self.dataset.workers)]
        self._last_worker = -1

    def __iter__(self) -> Iterator[Batch]:
        workers = self.dataset.settings.num_workers
        self.dataset.start = [dict(p) for p in self._positions]
        self.dataset.offset = (self._last_worker + 1) % self.dataset.workers  # next worker in the cycle
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
            persistent_workers=False,
            multiprocessing_context=self.multiprocessing_context if workers > 0 else None,
        )
        for batch in loader:
            position = batch.position
            self._positions[position["worker"]] = {k: v for k, v in position.items() if k != "worker"}
            self._last_worker = position["worker"]
            yield batch
        self._reset()  # a complete (eval) pass: the next iteration starts over

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (JSON- and torch.save-able) of what this process has yielded so far."""
        return {
            "format": STATE_FORMAT,
            "settings": self._fingerprint(),
            "last_worker": self._last_worker,
            "workers": [dict(p, video=list(p["video"]), images=list(p["images"])) for p in self._positions],
            "earlier": self.dataset.earlier,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken; the settings and shard list must be the same."""
        if state.get("format") not in (1, STATE_FORMAT):
            raise ValueError(f"loader state format {state.get('format')!r}, expected 1 to {STATE_FORMAT}")
        mine, theirs = self._fingerprint(), state["settings"]
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differ:
            raise ValueError(
                "loader state was saved with different settings, exact resume impossible: "
                + ", ".join(f"{k}: saved {theirs.get(k)!r}, now {mine.get(k)!r}" for k in differ)
            )
        if len(state["workers"]) != self.dataset.workers:
            raise ValueError(
                f"loader state has {len(state['workers'])} workers, expected {self.dataset.workers}"
            )
        self._positions = [
            {"batches": int(p["batches"]), "video": list(p["video"]), "images": list(p["images"])}
            for p in state["workers"]
        ]
        self._last_worker = int(state["last_worker"])
        self._set_earlier(state.get("earlier", []))

    def load_resized_state(self, states: list[dict[str, Any]]) -> None:
        """Continue the states of every rank of another world (in rank order, as `state_dict` gave them)
        at this loader's world size: see the module docstring and `stages.shards.resize`."""
        earlier, positions = resize.resized(states, self._fingerprint(), self.dataset.workers)
        self._positions, self._last_worker = positions, -1
        self._set_earlier(earlier)

    def _set_earlier(self, earlier: list[dict[str, Any]]) -> None:
        self.dataset.earlier = earlier
        self.dataset._seen_cache = {}

    def _fingerprint(self) -> dict[str, Any]:
        settings = asdict(self.dataset.settings)
        settings["shards"] = [Path(urlparse(u).path).name or u for u in self.dataset.urls]
        return settings


def make_loader(
    shard_dir_or_urls: str | os.PathLike | Sequence[str],
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    seed: int,
    image_fraction: float,
    shuffle_buffer: int,
    train: bool = True,
    *,
    images_per_item: int = 8,
    max_pending: int | None = None,
    allow_pipe: bool = False,
    remote: RemoteSettings | None = None,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
) -> ShardLoader:
    """Loader of same-shape micro-batches (`Batch`) for `rank` of `world_size`.

    Shards are split disjointly over world_size × max(1, num_workers) streams (fewer shards raise
    ValueError). train=True resamples forever, reshuffling the shard order each epoch; train=False
    makes one pass over every sample of this rank. image_fraction is the probability that a batch is
    a packed-image batch (`images_per_item` images of one size per item). `shuffle_buffer` samples are
    held per worker and kind; shape buckets hold at most `max_pending` samples per kind (default
    4 × batch_size; a packed item of images counts as one) before the largest bucket is emitted as a
    smaller batch. `remote` (default `RemoteSettings()`) sets the timeout and retries of `http(s)://`
    shards.
    """
    urls = resolve_shards(shard_dir_or_urls, allow_pipe)
    settings = StreamSettings(
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        seed=seed,
        image_fraction=float(image_fraction),
        shuffle_buffer=shuffle_buffer,
        train=train,
        images_per_item=images_per_item,
        max_pending=max_pending if max_pending is not None else 4 * batch_size,
        allow_pipe=allow_pipe,
    )
    stream = ShardStream(urls, settings, remote)
    return ShardLoader(stream, prefetch_factor, pin_memory, multiprocessing_context)


def loader_from_config(cfg: RunConfig, rank: int, world_size: int, train: bool = True) -> ShardLoader:
    """`make_loader` for a run: shards from `data.shards`, batch/worker/mix settings from `data`, seed
    from `train.seed`."""
    d = cfg.data
    if not d.shards:
        raise ValueError("data.shards: set the directory of preprocessed shards (preprocess.out of a run)")
    return make_loader(
        d.shards,
        batch_size=d.batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=d.num_workers,
        seed=cfg.train.seed,
        image_fraction=d.image_fraction,
        shuffle_buffer=d.shuffle_buffer,
        train=train,
        images_per_item=d.images_per_item or d.frames,
        max_pending=d.max_pending or None,
        allow_pipe=d.allow_pipe,
    )
