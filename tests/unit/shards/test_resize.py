"""Loader positions resumed at another world size: within the interrupted passes every sample is yielded
exactly once (keys counted across the resize: 2 → 1, 2 → 3, 1 → 2, 2 → 3 → 1), and a resized world
resumes at its own size exactly (the `dataset` fixture is in conftest.py)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from stages.shards.loader import make_loader
from tests.unit.shards.conftest import PER_SHARD, SHARDS

KINDS = ("video", "images")


def _loader(root, rank, world, **kw):
    args = dict(batch_size=2, num_workers=0, seed=3, image_fraction=0.3, shuffle_buffer=4, max_pending=3)
    args.update(kw)
    return make_loader(root, rank=rank, world_size=world, images_per_item=3, **args)


def _keys(batch) -> list[str]:
    return [k for item in batch.keys for k in item] if batch.kind == "images" else list(batch.keys)


def _epoch(batch) -> int:
    """The epoch of its kind's stream that `batch` belongs to (its position is the one after it)."""
    return batch.position[batch.kind][0]


def _state(loader) -> dict:
    return json.loads(json.dumps(loader.state_dict()))  # plain data, as a checkpoint holds it


class Run:
    """Every batch a sequence of worlds yields, by (epoch, key)."""

    def __init__(self) -> None:
        self.seen: Counter[tuple[int, str]] = Counter()

    def take(self, loaders, n: int) -> None:
        """`n` batches from each loader (the ranks of one world), kept running in `iters`."""
        for loader in loaders:
            it = iter(loader)
            for _ in range(n):
                batch = next(it)
                self.seen.update((_epoch(batch), key) for key in _keys(batch))

    def finish_epochs(self, loaders, last: int) -> None:
        """Draw from each loader until both of its kinds have gone past epoch `last`."""
        for loader in loaders:
            beyond = set()
            it = iter(loader)
            for _ in range(500):
                batch = next(it)
                epoch = _epoch(batch)
                if epoch > last:
                    beyond.add(batch.kind)
                    if beyond == set(KINDS):
                        break
                    continue
                self.seen.update((epoch, key) for key in _keys(batch))
            assert beyond == set(KINDS), "a loader never left the epochs checked"


ALL_KEYS = {f"s{i}_{j}" for i in range(SHARDS) for j in range(PER_SHARD)}


def _assert_each_once(run: Run, epochs: range) -> None:
    for epoch in epochs:
        counts = Counter({key: n for (e, key), n in run.seen.items() if e == epoch})
        duplicates = {k: n for k, n in counts.items() if n > 1}
        assert not duplicates, f"epoch {epoch}: seen twice or more: {duplicates}"
        assert set(counts) == ALL_KEYS, f"epoch {epoch}: never seen: {sorted(ALL_KEYS - set(counts))}"


def _resize(root, states, world, **kw):
    loaders = [_loader(root, rank, world, **kw) for rank in range(world)]
    for loader in loaders:
        loader.load_resized_state(states)
    return loaders


@pytest.mark.parametrize(
    ("worlds", "steps"),
    [((2, 1), (5,)), ((2, 3), (5,)), ((1, 2), (21,)), ((2, 3, 1), (3, 2))],
    ids=["2to1", "2to3", "1to2-across-an-epoch", "2to3to1"],
)
def test_every_sample_once_per_pass_across_a_resize(dataset, worlds, steps):
    root, _ = dataset
    run = Run()
    loaders = [_loader(root, rank, worlds[0]) for rank in range(worlds[0])]
    for world, n in zip(worlds[1:], steps):
        run.take(loaders, n)
        states = [_state(loader) for loader in loaders]
        loaders = _resize(root, states, world)
    reached = max(e for e, _ in run.seen)
    run.finish_epochs(loaders, reached)
    _assert_each_once(run, range(reached + 1))
    if worlds == (1, 2):
        assert reached >= 1  # the old world was already in its second pass


def test_a_resized_world_resumes_at_its_own_size_exactly(dataset):
    root, _ = dataset
    old = [_loader(root, rank, 2) for rank in range(2)]
    Run().take(old, 4)
    states = [_state(loader) for loader in old]
    reference = _resize(root, states, 3)[1]
    expected = [next(it) for it in [iter(reference)] for _ in range(9)]

    first = _resize(root, states, 3)[1]
    it = iter(first)
    head = [next(it) for _ in range(4)]
    resumed = _loader(root, 1, 3)
    resumed.load_state_dict(_state(first))
    it = iter(resumed)
    tail = [next(it) for _ in range(5)]
    assert [b.keys for b in head + tail] == [b.keys for b in expected]


def test_a_resize_refuses_other_settings_and_partial_worlds(dataset):
    root, _ = dataset
    old = [_loader(root, rank, 2) for rank in range(2)]
    states = [_state(loader) for loader in old]
    with pytest.raises(ValueError, match="seed: saved 3, now 4"):
        _loader(root, 0, 3, seed=4).load_resized_state(states)
    with pytest.raises(ValueError, match=r"every rank 0\.\.1"):
        _loader(root, 0, 3).load_resized_state([states[1], states[0]])
