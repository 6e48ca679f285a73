"""The preprocessing job end to end: real media, a corpus of bad inputs, killed and resumed runs, Ray."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from configs import SynthConfig, load_config
from stages.preprocess import local_shard_executor, run_preprocess
from stages.shards import decode_sample, read_shard, sha256_file
from stages.synth import run_synth
from tests import ROOT

SMALL = ["data.frames=4", "data.height=16", "data.width=16", "data.fps=4", "model.patch_size=[1,4,4]"]


def _cfg(out: Path, *extra: str):
    return load_config(
        overrides=[*SMALL, f"preprocess.out={out}", "preprocess.max_clips_per_video=2", *extra]
    )


def _check_accounting(out: Path, manifest: dict) -> list[dict]:
    """processed + failed == discovered; shards hash as recorded; lineage covers every sample once."""
    assert manifest["processed"] + manifest["failed"] == manifest["discovered"]
    assert json.loads((out / "manifest.json").read_text()) == {
        k: v for k, v in manifest.items() if k not in ("seconds", "resumed")
    }
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == manifest["failed"]
    assert all(f["path"] and f["stage"] and f["reason"] for f in failures)
    keys = []
    for shard in manifest["shards"]:
        path = out / "shards" / shard["name"]
        assert sha256_file(path) == shard["sha256"]
        members = list(read_shard(path))
        assert len(members) == shard["samples"]
        keys += [decode_sample(m).key for m in members]
    lineage = [json.loads(line) for line in (out / "lineage.jsonl").read_text().splitlines()]
    assert (
        sorted(e["key"] for e in lineage) == sorted(keys)
        and len(set(keys)) == len(keys) == manifest["samples"]
    )
    return failures


def test_every_shared_media_file_produces_samples(media, tmp_path):
    out = tmp_path / "out"
    manifest = run_preprocess(_cfg(out, "preprocess.workers=2"), [str(media())], progress=False)
    files = [p for p in media().iterdir() if p.suffix.lower() not in (".md",)]
    assert manifest["discovered"] == len(files)
    failures = _check_accounting(out, manifest)
    assert failures == [] and manifest["processed"] == len(files)
    sources = {json.loads(line)["source"] for line in (out / "lineage.jsonl").read_text().splitlines()}
    assert sources == {str(p.resolve()) for p in files}
    sample = decode_sample(next(read_shard(out / "shards" / manifest["shards"][0]["name"])))
    assert sample.frames.dtype.is_floating_point is False and sample.frames.shape[0] == 3


def _write_video(path: Path, frames: int, width: int, height: int, codec: str = "libx264") -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            ramp = (np.arange(width) * 4 + 6 * i) % 256  # a slowly sliding ramp: motion, no scene cut
            image = np.broadcast_to(ramp[None, :, None], (height, width, 3)).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def _write_audio_only(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 1024), dtype=np.float32)
        for _ in range(8):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = 16000
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _bad_corpus(folder: Path) -> None:
    folder.mkdir()
    good = folder / "good.mp4"
    _write_video(good, 12, 64, 48)
    (folder / "good.txt").write_text("a good clip")
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (folder / "text.mp4").write_text("this is not a video\n")
    _write_audio_only(folder / "audio_only.mp4")
    _write_video(folder / "one_frame.mp4", 1, 64, 48)
    _write_video(folder / "tiny.mp4", 8, 2, 2, codec="mpeg4")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 10000, 3), dtype=np.uint8)).save(
        folder / "wide.png"
    )
    png = folder / "corrupt.png"
    Image.new("RGB", (32, 32), "red").save(png)
    png.write_bytes(png.read_bytes()[:60])
    _write_video(folder / "badcaption.mp4", 8, 64, 48)
    (folder / "badcaption.txt").write_bytes(b"caf\xe9\xff")


def test_bad_inputs_become_failure_lines_and_the_job_finishes(tmp_path):
    _bad_corpus(tmp_path / "in")
    out = tmp_path / "out"
    cfg = _cfg(out, "preprocess.files_per_shard=3", "preprocess.min_source_side=4")
    manifest = run_preprocess(cfg, [str(tmp_path / "in")], progress=False)
    assert manifest["discovered"] == 10
    failures = {Path(f["path"]).name: f for f in _check_accounting(out, manifest)}
    expected_failed = {
        "zero.mp4",
        "truncated.mp4",
        "text.mp4",
        "audio_only.mp4",
        "tiny.mp4",
        "corrupt.png",
        "badcaption.mp4",
    }
    assert set(failures) == expected_failed
    assert (
        "UTF-8" in failures["badcaption.mp4"]["reason"] and failures["badcaption.mp4"]["stage"] == "discover"
    )
    assert "small" in failures["tiny.mp4"]["reason"]
    lineage = {
        Path(e["source"]).name for e in map(json.loads, (out / "lineage.jsonl").read_text().splitlines())
    }
    assert lineage == {"good.mp4", "one_frame.mp4", "wide.png"}
    assert manifest["shapes"].get("1x16x16", 0) >= 2  # the 1-frame video and the wide image


def _synth_inputs(folder: Path, count: int = 10) -> None:
    run_synth(folder, SynthConfig(count=count, frames=8, size=32, fps=8.0, seed=3), progress=False)


def test_killed_run_resumes_to_the_same_bytes(tmp_path):
    _synth_inputs(tmp_path / "in", count=30)
    args = [*SMALL, "preprocess.files_per_shard=1", "preprocess.workers=1"]
    clean = tmp_path / "clean"
    run_preprocess(
        load_config(overrides=[*args, f"preprocess.out={clean}"]), [str(tmp_path / "in")], progress=False
    )

    killed = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "preprocess",
        str(tmp_path / "in"),
        "--out",
        str(killed),
        "--local",
        "--quiet",
        *args,
    ]
    proc = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 120
    while (
        proc.poll() is None
        and time.monotonic() < deadline
        and len(list((killed / "parts").glob("*.json"))) < 2
    ):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the job and its decode processes, mid-run
    proc.wait()
    parts_before = len(list((killed / "parts").glob("*.json")))
    assert 0 < parts_before < 30, "the kill should land mid-run"
    assert not (killed / "manifest.json").exists()
    # What a kill inside a write leaves (the timing above rarely hits it): must not outlive the resume.
    (killed / "shards" / "train-000004.tar.tmp-99999").write_bytes(b"half a tar")
    (killed / "parts" / "train-000004.json.tmp-99999").write_text("{")

    manifest = run_preprocess(
        load_config(overrides=[*args, f"preprocess.out={killed}"]), [str(tmp_path / "in")], progress=False
    )
    assert manifest["resumed"] == parts_before
    assert (killed / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()
    assert (killed / "lineage.jsonl").read_bytes() == (clean / "lineage.jsonl").read_bytes()
    for shard in json.loads((clean / "manifest.json").read_text())["shards"]:
        assert (killed / "shards" / shard["name"]).read_bytes() == (
            clean / "shards" / shard["name"]
        ).read_bytes()
    for folder in ("shards", "parts"):
        assert sorted(p.name for p in (killed / folder).iterdir()) == sorted(
            p.name for p in (clean / folder).iterdir()
        )


def test_zstd_shards_hold_the_same_samples_in_fewer_bytes(tmp_path):
    _synth_inputs(tmp_path / "in", count=8)
    args = [*SMALL, "preprocess.files_per_shard=4", "preprocess.workers=1"]
    runs, members = {}, {}
    for c in ("none", "zstd"):
        cfg = load_config(overrides=[*args, f"preprocess.out={tmp_path / c}", f"preprocess.compression={c}"])
        runs[c] = run_preprocess(cfg, [str(tmp_path / "in")], progress=False)
        _check_accounting(tmp_path / c, runs[c])
        members[c] = [m for s in runs[c]["shards"] for m in read_shard(tmp_path / c / "shards" / s["name"])]
    assert runs["none"]["fingerprint"] != runs["zstd"]["fingerprint"]  # a rerun in another format starts over
    raw, packed = ([decode_sample(m) for m in members[c]] for c in ("none", "zstd"))
    assert [s.key for s in raw] == [s.key for s in packed] and raw
    for a, b in zip(raw, packed):
        assert torch.equal(a.frames, b.frames) and b.meta["compression"] == "zstd"
        assert {**a.meta, "compression": "zstd"} == b.meta
    size = {"none": sum(len(m["patches.npy"]) for m in members["none"])}
    size["zstd"] = sum(len(m["patches.npy.zst"]) for m in members["zstd"])
    assert size["zstd"] < size["none"] / 2, size  # flat synthetic shapes compress well (tar headers aside)


def test_a_full_disk_stops_the_job_in_one_line_and_a_rerun_with_room_finishes_it(
    tmp_path, small_disk, capsys
):
    from pipeline.cli import main

    _synth_inputs(tmp_path / "in", count=8)
    args = [*SMALL, "preprocess.files_per_shard=1", "preprocess.workers=1"]
    clean = tmp_path / "clean"
    run_preprocess(
        load_config(overrides=[*args, f"preprocess.out={clean}"]), [str(tmp_path / "in")], progress=False
    )
    shards_kb = sum(f.stat().st_size for f in (clean / "shards").iterdir()) // 1024
    subprocess.run(["mount", "-o", f"remount,size={shards_kb // 2}k", str(small_disk)], check=True)
    out = small_disk / "out"
    command = ["preprocess", str(tmp_path / "in"), "--out", str(out), "--local", "--quiet", *args]
    assert main(command) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert re.fullmatch(
        rf"error: no space left on device writing {out}/shards/train-\d{{6}}\.tar \(.*\)", error
    )
    assert not list(out.rglob("*.tmp-*")) and not (out / "manifest.json").exists()
    subprocess.run(["mount", "-o", f"remount,size={shards_kb * 4}k", str(small_disk)], check=True)
    assert main(command) == 0
    assert (out / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()


def test_ray_data_job_equals_the_local_job(tmp_path):
    from pipeline.ray_preprocess import ray_executor

    _synth_inputs(tmp_path / "in")
    args = [*SMALL, "preprocess.files_per_shard=4", "preprocess.workers=2"]
    local = run_preprocess(
        load_config(overrides=[*args, f"preprocess.out={tmp_path / 'local'}"]),
        [str(tmp_path / "in")],
        executor=local_shard_executor,
        progress=False,
    )
    on_ray = run_preprocess(
        load_config(overrides=[*args, f"preprocess.out={tmp_path / 'ray'}"]),
        [str(tmp_path / "in")],
        executor=ray_executor(),
        progress=False,
    )
    assert (tmp_path / "ray" / "manifest.json").read_bytes() == (
        tmp_path / "local" / "manifest.json"
    ).read_bytes()
    assert on_ray["samples"] == local["samples"] > 0


def test_dry_run_lists_and_counts(tmp_path, capsys):
    from pipeline.cli import main

    _synth_inputs(tmp_path / "in")
    assert main(["preprocess", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# total: 10" in out and "# video: 8" in out and "# image: 2" in out
    assert not (tmp_path / "out").exists()


def test_precomputed_t5_embeddings_reach_the_loader(tmp_path, tiny_t5_dir):
    from models.text import T5TextEncoder
    from stages.shards.loader import loader_from_config

    t5_path, _, _ = tiny_t5_dir
    _synth_inputs(tmp_path / "in", count=6)
    text = ["text.encoder=t5", f"text.t5_path={t5_path}", "text.max_length=48"]
    cfg = _cfg(tmp_path / "out", *text, "preprocess.text_embeddings=true", "preprocess.workers=1")
    manifest = run_preprocess(cfg, [str(tmp_path / "in")], executor=local_shard_executor, progress=False)
    assert manifest["samples"] > 0 and manifest["failed"] == 0
    plain = run_preprocess(_cfg(tmp_path / "plain"), [str(tmp_path / "in")], progress=False)
    assert plain["fingerprint"] != manifest["fingerprint"]  # embeddings are part of what a rerun reuses

    reference = T5TextEncoder(t5_path, max_length=48)
    samples = [
        decode_sample(m) for s in manifest["shards"] for m in read_shard(tmp_path / "out/shards" / s["name"])
    ]
    assert len(samples) == manifest["samples"]
    for sample in samples:
        emb = reference([sample.meta["caption"]])
        expected = emb.tokens[0][emb.mask[0]]  # padding dropped: (L, D)
        assert sample.text is not None and sample.text.dtype == torch.float16
        assert sample.text.shape == expected.shape and sample.meta["text_embedding"]["encoder"] == "t5:t5"
        torch.testing.assert_close(sample.text.float(), expected, atol=2e-3, rtol=2e-3)

    run = load_config(overrides=[*SMALL, *text, f"data.shards={tmp_path / 'out'}", "data.batch_size=2"])
    batch = next(iter(loader_from_config(run, rank=0, world_size=1, train=False)))
    lengths = batch.text_mask.sum(dim=1)
    assert batch.text.shape[:2] == batch.text_mask.shape and batch.text.shape[2] == 32
    for key, length in zip(batch.keys, lengths.tolist(), strict=True):
        (sample,) = [s for s in samples if s.key == key]
        assert length == sample.text.shape[0]
