"""The preprocessing stage: inputs → clips → patch shards, with full accounting and exact resume.

Inputs are sorted and cut into fixed groups of `preprocess.files_per_shard`; a group is the unit of work
and of resume: it becomes one shard `shards/{split}-{index:06d}.tar` plus a record `parts/{name}.json`
(written last, atomically) holding its samples, failures and lineage. A rerun redoes only groups without
a matching record, so a job killed at any point finishes with exactly the samples and bytes of an
uninterrupted run. `run_preprocess` runs without Ray (threads driving killable decode processes); the Ray
Data adapter in `pipeline/` passes its own executor.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from configs import RunConfig, fingerprint
from stages.atomic import remove_leftovers, write_text
from stages.folder_lock import folder_lock
from stages.media import ClipSpec
from stages.preprocess.decode_process import DecodeFailure, DecodeProcess
from stages.preprocess.discover import InputItem, discover
from stages.shards import SCHEMA_VERSION, encode_sample, write_shard
from stages.tables import key_value_table


@dataclass(frozen=True)
class ShardTask:
    """One group of inputs that becomes one shard."""

    index: int
    name: str  # "{split}-{index:06d}"
    items: tuple[InputItem, ...]


ShardExecutor = Callable[[list[ShardTask], RunConfig, Path], Iterator[dict[str, Any]]]
"""Runs shard tasks somewhere (`local_shard_executor`, `pipeline.ray_preprocess.ray_executor`) and yields
each task's record as it is committed."""


# --------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------


def sample_fingerprint(cfg: RunConfig) -> str:
    """Hash of everything that changes the samples (not workers, timeouts or the output path)."""
    p = cfg.preprocess
    return fingerprint(
        {
            "schema_version": SCHEMA_VERSION,
            "clip": [cfg.data.frames, cfg.data.height, cfg.data.width, cfg.data.fps],
            "patch_size": list(cfg.model.patch_size),
            "split": p.split,
            "stride": p.stride,
            "max_clips_per_video": p.max_clips_per_video,
            "scene_cut_threshold": p.scene_cut_threshold,
            "resize": p.resize,
            "buckets": [list(b) for b in p.buckets],
            "min_source_side": p.min_source_side,
            "files_per_shard": p.files_per_shard,
            "decoder": p.decoder,
            "compression": [p.compression, p.compression_level] if p.compression != "none" else "none",
            "text_embeddings": (
                [Path(cfg.text.t5_path).name, cfg.text.max_length] if p.text_embeddings else None
            ),
        }
    )


def plan_shards(items: list[InputItem], cfg: RunConfig) -> list[ShardTask]:
    """Fixed groups of `files_per_shard` items in discovery order."""
    n = cfg.preprocess.files_per_shard
    return [
        ShardTask(i // n, f"{cfg.preprocess.split}-{i // n:06d}", tuple(items[i : i + n]))
        for i in range(0, len(items), n)
    ]


def _record_path(out: Path, name: str) -> Path:
    return out / "parts" / f"{name}.json"


def _write_json(path: Path, obj: Any, lines: bool = False) -> None:
    text = "".join(json.dumps(o, sort_keys=True) + "\n" for o in obj) if lines else json.dumps(obj, indent=2)
    write_text(path, text)


def finished_record(out: Path, task: ShardTask, fp: str) -> dict[str, Any] | None:
    """The task's committed record when it matches this config and these inputs and its shard is intact."""
    path = _record_path(out, task.name)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("fingerprint") != fp or record.get("items") != [item.id for item in task.items]:
        return None
    shard = record.get("shard")
    if shard and not (out / "shards" / shard["name"]).is_file():
        return None
    return record


# --------------------------------------------------------------------------------------------------
# One shard
# --------------------------------------------------------------------------------------------------


class CaptionEmbedder:
    """Frozen T5 embeddings of captions, float16 (L, D) with the padding dropped; one model per process."""

    BATCH = 32

    def __init__(self, cfg: RunConfig) -> None:
        from models.text import T5TextEncoder

        self.encoder = T5TextEncoder(cfg.text.t5_path, max_length=cfg.text.max_length)
        self.name = f"t5:{Path(cfg.text.t5_path).name}"

    def __call__(self, captions: list[str]) -> dict[str, np.ndarray]:
        import torch  # this module stays light: decode processes' fork server may import it

        unique = sorted(set(captions))
        out: dict[str, np.ndarray] = {}
        for lo in range(0, len(unique), self.BATCH):
            batch = unique[lo : lo + self.BATCH]
            emb = self.encoder(batch)
            for caption, tokens, mask in zip(batch, emb.tokens, emb.mask, strict=True):
                out[caption] = tokens[mask].to(dtype=torch.float16).cpu().numpy()
        return out


def caption_embedder(cfg: RunConfig) -> CaptionEmbedder | None:
    """An embedder when `preprocess.text_embeddings` is on, else None; a worker builds it once."""
    return CaptionEmbedder(cfg) if cfg.preprocess.text_embeddings else None


def process_shard(
    task: ShardTask,
    cfg: RunConfig,
    out: Path,
    decoder: DecodeProcess,
    embedder: CaptionEmbedder | None = None,
) -> dict[str, Any]:
    """Decode every item of the task, write its shard (if any sample) and its record; returns the record.
    `embedder` (see `caption_embedder`) adds caption embeddings to the samples."""
    patch = tuple(cfg.model.patch_size)
    failures = []
    decoded = []
    for item, clips in decoder.imap(task.items):
        if isinstance(clips, DecodeFailure):
            failures.append({"path": item.id, "stage": clips.stage, "reason": clips.reason})
        elif not clips:
            reason = "no clip could be cut (too short for one patch of frames?)"
            failures.append({"path": item.id, "stage": "clips", "reason": reason})
        else:
            decoded.append((item, clips))
    embeddings = embedder([item.caption for item, _ in decoded]) if embedder else {}

    samples, lineage = [], []
    shapes: Counter[str] = Counter()
    processed = 0
    for item, clips in decoded:
        encoded = []
        try:
            for index, clip in enumerate(clips):
                key = f"{item.key}_{index:04d}"
                meta = {
                    "kind": clip.kind,
                    "fps": clip.fps,
                    "source": item.id,
                    "start_s": round(clip.start_s, 6),
                    "end_s": round(clip.end_s, 6),
                    "caption": item.caption,
                    "decoder": clip.decoder,
                    "source_size": list(clip.source_size),
                }
                members = encode_sample(
                    key,
                    clip.frames,
                    patch,
                    meta,
                    text_embedding=embeddings.get(item.caption),
                    text_encoder=embedder.name if embedder else "",
                    compression=cfg.preprocess.compression,
                    level=cfg.preprocess.compression_level,
                )
                encoded.append((key, members, clip))
        except ValueError as err:  # a clip the shard format refuses
            failures.append({"path": item.id, "stage": "encode", "reason": str(err)})
            continue
        processed += 1
        for key, members, clip in encoded:
            samples.append((key, members))
            t, h, w = clip.frames.shape[:3]
            shapes[f"{t}x{h}x{w}"] += 1
            lineage.append({"key": key, "source": item.id, "start_s": clip.start_s, "end_s": clip.end_s})
    order = {item.id: i for i, item in enumerate(task.items)}
    failures.sort(key=lambda f: order[f["path"]])

    shard = None
    if samples:
        info = write_shard(out / "shards" / f"{task.name}.tar", samples)
        shard = {"name": f"{task.name}.tar", "samples": info.samples, "sha256": info.sha256}
    record = {
        "fingerprint": sample_fingerprint(cfg),
        "name": task.name,
        "items": [item.id for item in task.items],
        "kinds": dict(Counter(item.kind for item in task.items)),
        "processed": processed,
        "failed": len(failures),
        "samples": len(samples),
        "shapes": dict(shapes),
        "shard": shard,
        "failures": failures,
        "lineage": lineage,
    }
    _write_json(_record_path(out, task.name), record)  # the commit marker, written last
    return record


# --------------------------------------------------------------------------------------------------
# Executors and the job
# --------------------------------------------------------------------------------------------------


def local_shard_executor(tasks: list[ShardTask], cfg: RunConfig, out: Path) -> Iterator[dict[str, Any]]:
    """`preprocess.workers` threads, each driving its own killable decode process."""
    spec = ClipSpec.from_config(cfg)
    p = cfg.preprocess
    pending = list(reversed(tasks))
    embedder = caption_embedder(cfg)  # one T5 for every worker thread (inference only)

    def worker() -> list[dict[str, Any]]:
        records = []
        with DecodeProcess(spec, p.decode_timeout_s, p.recycle_after) as decoder:
            while pending:
                try:
                    task = pending.pop()
                except IndexError:
                    break
                records.append(process_shard(task, cfg, out, decoder, embedder))
        return records

    workers = max(1, min(p.workers, len(tasks)))
    with ThreadPoolExecutor(workers) as pool:
        for future in as_completed([pool.submit(worker) for _ in range(workers)]):
            yield from future.result()


def _progress(records: Iterable[dict[str, Any]], total_files: int, enabled: bool) -> Iterator[dict[str, Any]]:
    if not enabled:
        yield from records
        return
    from tqdm.auto import tqdm

    with tqdm(total=total_files, desc="preprocess", unit="file") as bar:
        for record in records:
            bar.update(len(record["items"]))
            bar.set_postfix(samples=record["samples"], failed=record["failed"], refresh=False)
            yield record


def run_preprocess(
    cfg: RunConfig,
    inputs: list[str],
    executor: ShardExecutor = local_shard_executor,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the whole job into `cfg.preprocess.out`; returns the manifest (written to manifest.json) plus
    the run's `seconds` and `resumed` (shards reused from an earlier run)."""
    if not cfg.preprocess.out:
        raise ValueError("preprocess.out: set the output directory (--out DIR)")
    out = Path(cfg.preprocess.out)
    started = time.monotonic()
    items = discover(inputs)
    tasks = plan_shards(items, cfg)
    with folder_lock(out, "preprocess"):  # before reading what an earlier run left
        manifest, resumed = _run_tasks(out, cfg, tasks, executor, progress)
    return {**manifest, "seconds": round(time.monotonic() - started, 2), "resumed": resumed}


def _run_tasks(
    out: Path, cfg: RunConfig, tasks: list[ShardTask], executor: ShardExecutor, progress: bool
) -> tuple[dict[str, Any], int]:
    """Reuse the shards an earlier run finished, make the rest, write the outputs; (manifest, reused)."""
    fp = sample_fingerprint(cfg)
    records: dict[str, dict[str, Any]] = {}
    pending = []
    for task in tasks:
        record = finished_record(out, task, fp)
        if record is None:
            pending.append(task)
        else:
            records[task.name] = record
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for record in _progress(executor(pending, cfg, out), sum(len(t.items) for t in pending), progress):
        records[record["name"]] = record

    remove_leftovers(out)  # half-written by a process killed mid-write; every writer of this run is done
    return _write_outputs(out, cfg, tasks, records, fp), len(tasks) - len(pending)


def _write_outputs(
    out: Path, cfg: RunConfig, tasks: list[ShardTask], records: dict[str, dict[str, Any]], fp: str
) -> dict[str, Any]:
    ordered = [records[task.name] for task in tasks]
    planned = {f"{task.name}.tar" for task in tasks}
    for stale in (out / "shards").glob(f"{cfg.preprocess.split}-*.tar"):
        if stale.name not in planned or not records[stale.stem]["shard"]:
            stale.unlink()  # left by an earlier run with other inputs
    shapes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for record in ordered:
        shapes.update(record["shapes"])
        kinds.update(record["kinds"])
    shards = [record["shard"] for record in ordered if record["shard"]]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fp,
        "discovered": sum(len(r["items"]) for r in ordered),
        "processed": sum(r["processed"] for r in ordered),
        "failed": sum(r["failed"] for r in ordered),
        "samples": sum(r["samples"] for r in ordered),
        "by_kind": dict(sorted(kinds.items())),
        "shapes": dict(sorted(shapes.items())),
        "clip": {
            "frames": cfg.data.frames,
            "height": cfg.data.height,
            "width": cfg.data.width,
            "fps": cfg.data.fps,
        },
        "patch_size": list(cfg.model.patch_size),
        "shards": shards,
    }
    if manifest["processed"] + manifest["failed"] != manifest["discovered"]:
        raise RuntimeError(f"accounting does not add up: {manifest}")
    _write_json(out / "failures.jsonl", [f for r in ordered for f in r["failures"]], lines=True)
    _write_json(out / "lineage.jsonl", [entry for r in ordered for entry in r["lineage"]], lines=True)
    _write_json(out / "manifest.json", manifest)
    return manifest


def manifest_table(manifest: dict[str, Any]) -> str:
    """The end-of-job table."""
    rows = [
        ("discovered", manifest["discovered"]),
        ("processed", manifest["processed"]),
        ("failed", manifest["failed"]),
        ("samples", manifest["samples"]),
        ("shards", len(manifest["shards"])),
        ("shards reused", manifest.get("resumed", 0)),
        *((f"kind {k}", v) for k, v in manifest["by_kind"].items()),
        *((f"shape {k}", v) for k, v in manifest["shapes"].items()),
        ("seconds", manifest.get("seconds", "")),
    ]
    return key_value_table(rows)
