"""Training loader: disjoint coverage over ranks × workers, one shape per batch, exact pixels, image
packing, bounded buckets, exact resume (num_workers 0 and 2), and batches that pickle and pin (the
`dataset` fixture is in conftest.py)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from stages.shards.loader import Batch, Bucketer, Record, make_loader


def _flat_keys(batch) -> list[str]:
    return [k for item in batch.keys for k in item] if batch.kind == "images" else list(batch.keys)


def _check_pixels(batch, frames) -> None:
    """Every batch has one shape and rebuilds the exact uint8 frames of its samples."""
    x = batch.x
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    pixels = ((x + 1) * 127.5).round().to(torch.uint8)  # (B, C, T, H, W)
    for b, key in enumerate(batch.keys):
        if batch.kind == "video":
            expected = torch.from_numpy(frames[key]).permute(3, 0, 1, 2)
            assert torch.equal(pixels[b], expected), key
        else:
            for t, k in enumerate(key):
                assert torch.equal(pixels[b, :, t], torch.from_numpy(frames[k][0]).permute(2, 0, 1)), k


def _loader(root, **kw):
    args = dict(
        batch_size=2, rank=0, world_size=1, num_workers=0, seed=3, image_fraction=0.0, shuffle_buffer=4
    )
    args.update(kw)
    return make_loader(root, images_per_item=3, **args)


@pytest.mark.integration  # DataLoader worker processes
def test_eval_covers_every_sample_once_across_ranks_and_workers(dataset):
    root, frames = dataset
    per_rank = []
    for rank in range(2):
        keys = []
        for batch in _loader(root, rank=rank, world_size=2, num_workers=2, image_fraction=0.5, train=False):
            _check_pixels(batch, frames)
            keys += _flat_keys(batch)
        assert len(keys) == len(set(keys))
        per_rank.append(set(keys))
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == set(frames)


def test_image_fraction_packs_images_with_segments(dataset):
    root, frames = dataset
    kinds = []
    for batch, _ in zip(_loader(root, image_fraction=0.5), range(16)):
        _check_pixels(batch, frames)
        kinds.append(batch.kind)
        b, c, t, h, w = batch.x.shape
        if batch.kind == "images":
            assert (c, h, w) == (3, 8, 8)
            assert t == 3 or b == 1  # images_per_item frames per item; one short item at an epoch end
            assert torch.equal(batch.segments, torch.arange(t).expand(b, t))
            assert torch.equal(batch.fps, torch.zeros(b, t))
            assert [len(c) for c in batch.captions] == [t] * b
            assert batch.captions[0][0] == f"caption {batch.keys[0][0]}"
        else:
            assert batch.segments is None and batch.fps.shape == (b,) and t == 4
            assert batch.captions == [f"caption {k}" for k in batch.keys]
    assert {"images", "video"} == set(kinds)
    only_video = [b.kind for b, _ in zip(_loader(root, image_fraction=0.0), range(8))]
    assert set(only_video) == {"video"}


def test_batches_flatten_captions_pickle_and_pin_every_tensor(dataset, monkeypatch):
    root, _ = dataset
    batches = [batch for batch, _ in zip(_loader(root, image_fraction=0.5), range(16))]
    for kind in ("video", "images"):
        batch = next(b for b in batches if b.kind == kind)
        assert batch.flat_captions() == [f"caption {k}" for k in _flat_keys(batch)]
        again = pickle.loads(pickle.dumps(batch))  # what DataLoader workers send to the main process
        assert _same(again, batch) and again.flat_captions() == batch.flat_captions()
        assert torch.equal(again.fps, batch.fps) and again.kind == kind

    pinned: list[torch.Tensor] = []

    def pin(tensor):  # pinning itself needs an accelerator: record the call, copy the tensor
        pinned.append(tensor)
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    b, t = 2, 3
    batch = Batch(
        x=torch.rand(b, 3, t, 8, 8),
        kind="images",
        captions=[["a"] * t] * b,
        keys=[["k"] * t] * b,
        fps=torch.zeros(b, t),
        segments=torch.arange(t).expand(b, t).clone(),
        text=torch.rand(b, t, 5, 4),
        text_mask=torch.ones(b, t, 5, dtype=torch.bool),
        position={"worker": 0, "batches": 1, "video": [0, 0], "images": [0, 1]},
    )
    copy = batch.pin_memory()
    tensors = [batch.x, batch.fps, batch.segments, batch.text, batch.text_mask]
    assert len(pinned) == len(tensors) and all(any(seen is want for seen in pinned) for want in tensors)
    for name in ("x", "fps", "segments", "text", "text_mask"):
        assert torch.equal(getattr(copy, name), getattr(batch, name))
        assert getattr(copy, name) is not getattr(batch, name)
    assert (copy.kind, copy.captions, copy.keys, copy.position) == (
        batch.kind,
        batch.captions,
        batch.keys,
        batch.position,
    )
    assert batch.replace(segments=None, text=None, text_mask=None).pin_memory().text is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory)")
def test_pin_memory_loader_yields_pinned_batches(dataset):
    root, frames = dataset
    loader = _loader(root, image_fraction=0.5, num_workers=2, pin_memory=True)
    for batch, _ in zip(loader, range(8)):
        _check_pixels(batch, frames)
        assert batch.x.is_pinned() and batch.fps.is_pinned()
        assert batch.segments is None or batch.segments.is_pinned()


def test_pipe_urls_and_too_few_shards_are_refused(dataset, tmp_path):
    root, _ = dataset
    with pytest.raises(ValueError, match="pipe:"):
        _loader("pipe:cat /tmp/x.tar")
    with pytest.raises(ValueError, match="pipe:"):
        _loader([str(next((root / "shards").glob("*.tar"))), "pipe:curl http://x/y.tar"])
    with pytest.raises(ValueError, match=r"8 shards .* 3 ranks × 3 workers"):
        _loader(root, world_size=3, num_workers=3)
    with pytest.raises(ValueError, match="no shards"):
        _loader(tmp_path)


def test_bucketer_bounds_pending_and_drops_nothing():
    def record(i, shape):
        return Record(members={"i": i}, meta={"frames": shape[0], "height": shape[1], "width": shape[2]})

    shapes = [(1, 8, 8 + 4 * (i % 5)) for i in range(7)] * 10
    bucketer, out = Bucketer(capacity=6, item=3, max_pending=9), []
    for i, shape in enumerate(shapes):
        out += bucketer.add(record(i, shape))
        assert bucketer.total < 9
    out += list(bucketer.flush())
    assert sorted(r.members["i"] for batch in out for r in batch) == list(range(len(shapes)))
    for batch in out:
        assert len({r.shape for r in batch}) == 1
        assert len(batch) <= 6 and (len(batch) % 3 == 0 or len(batch) < 3)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a, b) -> bool:
    return a.keys == b.keys and torch.equal(a.x, b.x) and a.position == b.position


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.integration)])
def test_resume_yields_the_batches_of_an_uninterrupted_run(dataset, workers):
    root, _ = dataset
    kw = dict(rank=1, world_size=2, num_workers=workers, image_fraction=0.3, max_pending=3)
    k, m = 7, 20  # k is odd: the resumed run must start with the second worker; m crosses epochs
    reference = _take(_loader(root, **kw), k + m)

    first = _loader(root, **kw)
    head = _take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # plain data, as a checkpoint would hold
    resumed = _loader(root, **kw)
    resumed.load_state_dict(state)
    tail = _take(resumed, m)
    assert all(_same(a, b) for a, b in zip(head + tail, reference))
    assert max(b.position["video"][0] for b in reference) >= 1  # the run went past an epoch

    with pytest.raises(ValueError, match="seed"):
        _loader(root, **{**kw, "seed": 4}).load_state_dict(state)


@pytest.mark.integration  # DataLoader worker processes
def test_eval_resume_finishes_the_pass_exactly(dataset):
    root, _ = dataset
    kw = dict(num_workers=2, image_fraction=0.5, train=False)
    reference = list(_loader(root, **kw))
    loader = _loader(root, **kw)
    head = _take(loader, 5)
    resumed = _loader(root, **kw)
    resumed.load_state_dict(loader.state_dict())
    tail = list(resumed)
    assert len(head) + len(tail) == len(reference)
    assert all(_same(a, b) for a, b in zip(head + tail, reference))
    assert resumed.state_dict()["workers"][0]["batches"] == 0  # a finished pass starts over


def test_loader_from_config_needs_the_shard_directory():
    from configs import load_config
    from stages.shards.loader import loader_from_config

    with pytest.raises(ValueError, match=r"data\.shards: set the directory"):
        loader_from_config(load_config(), rank=0, world_size=1)
