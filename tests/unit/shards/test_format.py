"""Shard format: exact patch round trips, deterministic atomic tar files, and reading that never unpickles."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from stages.shards import decode_sample, encode_sample, read_shard, sha256_file, write_shard
from stages.shards import format as shards


def _frames(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


def _meta(kind: str = "video", **extra) -> dict:
    return {
        "kind": kind,
        "fps": 8.0 if kind == "video" else 0.0,
        "source": "videos/clip.mp4",
        "start_s": 0.5,
        "end_s": 1.0,
        "caption": "a red circle moving left — ünïcode",
        "decoder": "pyav",
        **extra,
    }


def _samples(n: int = 3) -> list[tuple[str, dict[str, bytes]]]:
    return [
        (f"k{i:04d}", encode_sample(f"k{i:04d}", _frames(2, 4, 4, seed=i), (1, 2, 2), _meta()))
        for i in range(n)
    ]


@pytest.mark.parametrize("patch", [(1, 1, 1), (1, 2, 2), (2, 4, 4), (4, 2, 8)])
def test_round_trip_is_exact(patch):
    frames = _frames(4, 8, 16, seed=sum(patch))
    members = encode_sample("3f9c0a1b2c3d4e5f_0002", frames, patch, _meta(source_size=[720, 1280]))
    assert sorted(members) == ["json", "patches.npy"]
    sample = decode_sample(members)
    assert sample.key == "3f9c0a1b2c3d4e5f_0002" and sample.text is None
    assert sample.frames.dtype == torch.uint8 and sample.frames.shape == (3, 4, 8, 16)  # (C, T, H, W)
    assert torch.equal(sample.frames, torch.from_numpy(frames).permute(3, 0, 1, 2))
    meta = sample.meta
    assert meta["schema_version"] == 2 and meta["patch_size"] == list(patch)
    assert meta["compression"] == "none"
    assert meta["grid"] == [4 // patch[0], 8 // patch[1], 16 // patch[2]]
    assert (meta["frames"], meta["height"], meta["width"], meta["channels"]) == (4, 8, 16, 3)
    assert meta["caption"] == _meta()["caption"] and meta["source_size"] == [720, 1280]
    patches = np.load(io.BytesIO(members["patches.npy"]), allow_pickle=False)
    assert patches.dtype == np.uint8 and patches.shape == (np.prod(meta["grid"]), np.prod(patch) * 3)


def test_image_with_text_embedding_round_trips():
    frames = _frames(1, 6, 4)
    emb = np.random.default_rng(1).standard_normal((5, 7)).astype(np.float16)
    members = encode_sample("img_0", frames, (1, 2, 2), _meta("image"), text_embedding=emb, text_encoder="t5")
    assert sorted(members) == ["json", "patches.npy", "text.npy"]
    sample = decode_sample(members)
    assert torch.equal(sample.frames, torch.from_numpy(frames).permute(3, 0, 1, 2))
    assert torch.equal(sample.text, torch.from_numpy(emb))
    assert sample.meta["text_embedding"] == {"shape": [5, 7], "dtype": "float16", "encoder": "t5"}


def test_encode_validates_shapes_key_and_meta():
    with pytest.raises(ValueError, match=r"\(3, 8, 8\).*\(2, 4, 4\)"):
        encode_sample("k", _frames(3, 8, 8), (2, 4, 4), _meta())
    with pytest.raises(ValueError, match="key"):
        encode_sample("Bad-Key", _frames(2, 4, 4), (1, 2, 2), _meta())
    with pytest.raises(ValueError, match="uint8"):
        encode_sample("k", _frames(2, 4, 4).astype(np.float32), (1, 2, 2), _meta())
    with pytest.raises(ValueError, match="missing"):
        encode_sample("k", _frames(2, 4, 4), (1, 2, 2), {"kind": "video"})
    with pytest.raises(ValueError, match="1 frame"):
        encode_sample("k", _frames(2, 4, 4), (1, 2, 2), _meta("image"))


def test_reading_refuses_pickles_unknown_versions_and_missing_members():
    members = encode_sample("k1", _frames(2, 4, 4), (1, 2, 2), _meta())
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}] * 8, dtype=object).reshape(8, 1), allow_pickle=True)
    with pytest.raises(ValueError, match="object dtype"):
        decode_sample({**members, "patches.npy": buf.getvalue()})
    wrong = io.BytesIO()
    np.save(wrong, np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match="expected a C-order uint8"):
        decode_sample({**members, "patches.npy": wrong.getvalue()})

    meta = json.loads(members["json"])
    meta["schema_version"] = 3
    with pytest.raises(ValueError, match=r"k1.*schema_version 3"):
        decode_sample({**members, "json": json.dumps(meta).encode()})
    with pytest.raises(ValueError, match=r"k1.*needs member k1\.patches\.npy alone"):
        decode_sample({"__key__": "k1", "json": members["json"]})
    with pytest.raises(ValueError, match=r"k1.*unknown members \['evil.pyd'\]"):
        decode_sample({**members, "evil.pyd": b"\x80\x04K\x01."})
    with pytest.raises(ValueError, match=r"k1.*missing member k1\.json"):
        decode_sample({"__key__": "k1", "patches.npy": members["patches.npy"]})


def test_shard_bytes_are_deterministic_and_read_back(tmp_path):
    samples = _samples()
    a = write_shard(tmp_path / "train-000000.tar", samples)
    b = write_shard(tmp_path / "other.tar", list(reversed(list(reversed(samples)))))
    assert (tmp_path / "train-000000.tar").read_bytes() == (tmp_path / "other.tar").read_bytes()
    assert a.sha256 == b.sha256 == sha256_file(tmp_path / "other.tar")
    assert (a.name, a.samples, a.bytes) == ("train-000000.tar", 3, (tmp_path / "other.tar").stat().st_size)

    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == [f"k{i:04d}.{s}" for i in range(3) for s in ("json", "patches.npy")]
    assert all((i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) == (0, 0, 0, "", "", 0o644) for i in infos)
    assert all(not i.pax_headers for i in infos)

    read = list(read_shard(tmp_path / "train-000000.tar"))
    assert [r["__key__"] for r in read] == ["k0000", "k0001", "k0002"]
    for r, (_, members) in zip(read, samples):
        assert {k: v for k, v in r.items() if not k.startswith("__")} == members


def test_write_is_atomic(tmp_path, monkeypatch):
    final = tmp_path / "train-000001.tar"
    write_shard(final, _samples(1))
    before = final.read_bytes()
    calls = []

    def failing_addfile(self, tarinfo, fileobj=None):
        calls.append(tarinfo.name)
        if len(calls) % 3 == 0:
            raise OSError("disk full")
        return original(self, tarinfo, fileobj)

    original = tarfile.TarFile.addfile
    monkeypatch.setattr(tarfile.TarFile, "addfile", failing_addfile)
    with pytest.raises(OSError, match="disk full"):
        write_shard(final, _samples(3))
    assert final.read_bytes() == before  # the old shard is untouched, no partial one replaced it
    with pytest.raises(OSError):
        write_shard(tmp_path / "train-000002.tar", _samples(3))
    assert not (tmp_path / "train-000002.tar").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000001.tar"]  # no temporary files left
    monkeypatch.undo()
    write_shard(tmp_path / "train-000002.tar", _samples(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000001.tar", "train-000002.tar"]


def test_write_refuses_bad_and_duplicate_keys(tmp_path):
    members = _samples(1)[0][1]
    with pytest.raises(ValueError, match="duplicate sample key k"):
        write_shard(tmp_path / "a.tar", [("k", members), ("k", members)])
    with pytest.raises(ValueError, match="key"):
        write_shard(tmp_path / "a.tar", [("a.b", members)])
    assert list(tmp_path.iterdir()) == []


def _raw_tar(path, names):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["k1.json", "README"], "README"),
        (["k1.json", "sub/k2.json"], "sub/k2.json"),
        (["k1.json", "k1.json"], "duplicate member k1.json"),
        (["k1.json", "k2.json", "k1.patches.npy"], "not contiguous"),
    ],
)
def test_read_shard_skips_nothing_silently(tmp_path, names, message):
    path = tmp_path / "bad.tar"
    _raw_tar(path, names)
    with pytest.raises(ValueError, match=f"bad.tar.*{message}"):
        list(read_shard(path))


def test_schema_constants():
    assert shards.SCHEMA_VERSION == 2 and shards.READ_VERSIONS == (1, 2)
    assert set(shards.META_FIELDS) == {"kind", "fps", "source", "start_s", "end_s", "caption", "decoder"}


@pytest.mark.parametrize("level", [1, 3, 19])
def test_zstd_samples_decode_to_the_same_frames_as_raw_ones(level):
    # a smooth clip (what video is), so compression has something to find
    ramp = np.arange(16, dtype=np.uint8)
    frames = np.broadcast_to(ramp[None, None, :, None] * 8 + ramp[None, :, None, None], (4, 16, 16, 3)).copy()
    raw = encode_sample("k1", frames, (1, 4, 4), _meta())
    packed = encode_sample("k1", frames, (1, 4, 4), _meta(), compression="zstd", level=level)
    assert sorted(packed) == ["json", "patches.npy.zst"]
    assert len(packed["patches.npy.zst"]) < len(raw["patches.npy"]) / 4
    a, b = decode_sample(raw), decode_sample(packed)
    assert torch.equal(a.frames, b.frames) and torch.equal(
        b.frames, torch.from_numpy(frames).permute(3, 0, 1, 2)
    )
    assert (a.meta["compression"], b.meta["compression"]) == ("none", "zstd")
    # stock webdataset's decode handler gives the same patch array for either member
    from_raw = shards.webdataset_decoder("k1.patches.npy", raw["patches.npy"])
    assert np.array_equal(
        shards.webdataset_decoder("k1.patches.npy.zst", packed["patches.npy.zst"]), from_raw
    )
    assert shards.webdataset_decoder("k1.json", packed["json"])["compression"] == "zstd"


def test_version_1_samples_are_still_read():
    frames = _frames(2, 4, 4)
    members = encode_sample("k1", frames, (1, 2, 2), _meta())
    meta = json.loads(members["json"])
    meta["schema_version"] = 1
    del meta["compression"]
    old = {**members, "json": json.dumps(meta).encode()}
    sample = decode_sample(old)
    assert torch.equal(sample.frames, torch.from_numpy(frames).permute(3, 0, 1, 2))
    assert sample.meta["compression"] == "none"
    meta["compression"] = "zstd"  # version 1 had no compression
    with pytest.raises(ValueError, match=r"k1: compression 'zstd'"):
        decode_sample({**members, "json": json.dumps(meta).encode()})


def test_bad_compressed_members_name_the_sample():
    frames = _frames(2, 4, 4)
    packed = encode_sample("k1", frames, (1, 2, 2), _meta(), compression="zstd")
    with pytest.raises(ValueError, match=r"k1\.patches\.npy\.zst: not a valid zstd frame"):
        decode_sample({**packed, "patches.npy.zst": b"not zstd at all"})
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(bytes(10**7))  # declares 10 MB for a 2×4×4 clip
    with pytest.raises(ValueError, match=r"declares 10000000 bytes"):
        decode_sample({**packed, "patches.npy.zst": bomb})
    raw = encode_sample("k1", frames, (1, 2, 2), _meta())
    with pytest.raises(ValueError, match=r"needs member k1\.patches\.npy\.zst alone"):
        decode_sample({**packed, "patches.npy": raw["patches.npy"]})
    with pytest.raises(ValueError, match=r"compression 'lz4', expected one of"):
        encode_sample("k1", frames, (1, 2, 2), _meta(), compression="lz4")


def test_stock_webdataset_reads_compressed_shards_with_the_documented_decoder(tmp_path):
    import webdataset as wds

    frames = [_frames(2, 4, 4, seed=i) for i in range(3)]
    samples = [
        (f"k{i}", encode_sample(f"k{i}", f, (1, 2, 2), _meta(), compression="zstd"))
        for i, f in enumerate(frames)
    ]
    write_shard(tmp_path / "train-000000.tar", samples)
    url = str(tmp_path / "train-000000.tar")
    read = list(wds.WebDataset(url, shardshuffle=False).decode(shards.webdataset_decoder))
    assert [r["__key__"] for r in read] == ["k0", "k1", "k2"]
    for r, f in zip(read, frames):
        raw = encode_sample("k", f, (1, 2, 2), _meta())["patches.npy"]  # the same patches, uncompressed
        assert r["json"]["compression"] == "zstd"
        assert np.array_equal(r["patches.npy.zst"], np.load(io.BytesIO(raw), allow_pickle=False))
