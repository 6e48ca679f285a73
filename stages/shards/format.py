"""Shard format (schema version 2): samples as losslessly patchified uint8 arrays in POSIX tar files.

A sample is identified by a key of [a-z0-9_] and stored as tar members that share that key:

- `{key}.json`        UTF-8 JSON metadata (see `encode_sample`, docs/SHARDS.md);
- `{key}.patches.npy` uint8 patches (T'·H'·W', pt·ph·pw·C), the output of `models.layers.patchify`;
  or `{key}.patches.npy.zst`, the same `.npy` bytes compressed with zstd (JSON `"compression": "zstd"`);
- `{key}.text.npy`    optional float16 (L, D) precomputed text embedding.

Version 2 added the zstd member and the JSON's `compression` field; version 1 samples (always
uncompressed, no `compression` field) are still read. `webdataset_decoder` decodes either member for
stock `webdataset`.

Writing is deterministic (same samples → same bytes and sha256) and atomic (temporary name, fsync,
rename), so a rerun can trust any shard it finds. Reading never executes code: `.npy` members are
loaded with `allow_pickle=False` after their header is checked against the JSON, and the JSON is
parsed with `json` only. Dimension names follow DESIGN.md: B, C, T, H, W pixels; T', H', W' grid.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from stages.atomic import atomic_path

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 2
"""Version written into every sample's JSON."""
READ_VERSIONS = (1, 2)
"""Versions readers accept (1: before compression; its samples are read as uncompressed)."""
COMPRESSIONS = ("none", "zstd")

CHANNELS = 3
KINDS = ("video", "image")
JSON, PATCHES, PATCHES_ZSTD, TEXT = "json", "patches.npy", "patches.npy.zst", "text.npy"
MEMBER_SUFFIXES = (JSON, PATCHES, PATCHES_ZSTD, TEXT)
KEY_RE = re.compile(r"[a-z0-9_]{1,80}")
_MEMBER_RE = re.compile(r"([a-z0-9_]{1,80})\.([a-z0-9_.]+)")
_NPY_MAGIC = b"\x93NUMPY"

# Fields the caller supplies in `meta` (the rest of the JSON is derived from the frames and patch).
META_FIELDS: dict[str, type | tuple[type, ...]] = {
    "kind": str,
    "fps": (int, float),
    "source": str,
    "start_s": (int, float),
    "end_s": (int, float),
    "caption": str,
    "decoder": str,
}
_DERIVED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "key": str,
    "grid": list,
    "patch_size": list,
    "channels": int,
    "frames": int,
    "height": int,
    "width": int,
}


# --------------------------------------------------------------------------------------------------
# Samples: encode / decode
# --------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One decoded sample: frames (C, T, H, W) uint8 rebuilt exactly, its JSON metadata, text or None."""

    key: str
    frames: torch.Tensor
    meta: dict[str, Any]
    text: torch.Tensor | None = None


def check_key(key: str) -> str:
    """Return `key` if it is 1-80 characters of [a-z0-9_], else raise ValueError naming it."""
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise ValueError(f"sample key {key!r}: expected 1-80 characters of [a-z0-9_]")
    return key


def encode_sample(
    key: str,
    frames: np.ndarray,
    patch: tuple[int, int, int],
    meta: dict[str, Any],
    *,
    text_embedding: np.ndarray | None = None,
    text_encoder: str = "",
    compression: str = "none",
    level: int = 3,
) -> dict[str, bytes]:
    """Encode uint8 frames (T, H, W, 3) as tar members {suffix: bytes} of one sample.

    `meta` holds the fields of `META_FIELDS` (kind "video" | "image", fps, source, start_s, end_s,
    caption, decoder) plus any extra JSON-serializable fields (kept, ignored by readers); grid, patch
    size and pixel sizes are derived here. An optional float16
    (L, D) `text_embedding` becomes a third member, described in the JSON with `text_encoder`.
    `compression="zstd"` stores the patches as `patches.npy.zst` at zstd `level` (lossless).
    """
    check_key(key)
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(f"sample {key}: frames must be a uint8 array (T, H, W, 3), got {_describe(frames)}")
    t, h, w, c = frames.shape
    if c != CHANNELS or min(t, h, w) < 1:
        raise ValueError(f"sample {key}: frames must be (T, H, W, 3) with T, H, W >= 1, got {frames.shape}")
    pt, ph, pw = _check_patch(patch, key)
    if t % pt or h % ph or w % pw:
        raise ValueError(
            f"sample {key}: frames (T, H, W) = {(t, h, w)} are not divisible by the patch (pt, ph, pw) = "
            f"{(pt, ph, pw)}"
        )
    _check_meta(meta, key)
    if compression not in COMPRESSIONS:
        raise ValueError(f"sample {key}: compression {compression!r}, expected one of {COMPRESSIONS}")
    if meta["kind"] == "image" and t != 1:
        raise ValueError(f"sample {key}: kind 'image' needs exactly 1 frame, got T = {t}")

    import torch  # imported when used: decode processes' fork server imports this module, not torch

    from models.layers import patchify

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)[None]  # (1, C, T, H, W)
    tokens = patchify(x, (pt, ph, pw))[0].contiguous().numpy()  # (T'·H'·W', pt·ph·pw·C)
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "key": key,
        "grid": [t // pt, h // ph, w // pw],
        "patch_size": [pt, ph, pw],
        "channels": CHANNELS,
        "frames": t,
        "height": h,
        "width": w,
        "compression": compression,
        **meta,
    }
    members = {PATCHES: _npy_bytes(tokens)}
    if compression == "zstd":
        members = {PATCHES_ZSTD: _zstd().ZstdCompressor(level=level).compress(members[PATCHES])}
    if text_embedding is not None:
        emb = np.asarray(text_embedding)
        if emb.ndim != 2 or emb.dtype != np.float16 or 0 in emb.shape:
            raise ValueError(f"sample {key}: text_embedding must be float16 (L, D), got {_describe(emb)}")
        record["text_embedding"] = {"shape": list(emb.shape), "dtype": "float16", "encoder": text_encoder}
        members[TEXT] = _npy_bytes(emb)
    try:
        text = json.dumps(record, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"sample {key}: meta is not plain JSON (str, int, float, list, dict): {exc}"
        ) from None
    members[JSON] = text.encode("utf-8")
    return dict(sorted(members.items()))


def decode_meta(members: dict[str, Any]) -> dict[str, Any]:
    """Parse and validate the JSON member of a sample without touching its arrays (cheap)."""
    key = members.get("__key__", "?")
    if JSON not in members:
        raise ValueError(f"sample {key}: missing member {key}.{JSON} (members: {_member_names(members)})")
    try:
        meta = json.loads(bytes(members[JSON]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"sample {key}: {key}.{JSON} is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"sample {key}: {key}.{JSON} must hold a JSON object")
    named = key != "?"
    if not named and isinstance(meta.get("key"), str):
        key = meta["key"]  # a bare member dict: name errors after the key the JSON claims
    version = meta.get("schema_version")
    if version not in READ_VERSIONS or isinstance(version, bool):
        raise ValueError(
            f"sample {key}: unknown schema_version {version!r} (this reader understands {READ_VERSIONS})"
        )
    meta.setdefault("compression", "none")  # version 1
    if meta["compression"] not in COMPRESSIONS or (version == 1 and meta["compression"] != "none"):
        raise ValueError(f"sample {key}: compression {meta['compression']!r} in {key}.{JSON} is unknown")
    unknown = sorted(set(_member_names(members)) - set(MEMBER_SUFFIXES))
    if unknown:
        raise ValueError(
            f"sample {key}: unknown members {unknown} (schema {SCHEMA_VERSION} has {MEMBER_SUFFIXES})"
        )
    for name, kind in {**_DERIVED_FIELDS, **META_FIELDS}.items():
        if name not in meta or isinstance(meta[name], bool) or not isinstance(meta[name], kind):
            raise ValueError(f"sample {key}: field {name!r} missing or of the wrong type in {key}.{JSON}")
    if named and meta["key"] != key:
        raise ValueError(f"sample {key}: the JSON names key {meta['key']!r}")
    grid, patch = meta["grid"], meta["patch_size"]
    if not all(_is_dims(v) for v in (grid, patch)) or meta["channels"] != CHANNELS:
        raise ValueError(f"sample {key}: bad grid {grid}, patch_size {patch} or channels {meta['channels']}")
    if [g * p for g, p in zip(grid, patch)] != [meta["frames"], meta["height"], meta["width"]]:
        raise ValueError(
            f"sample {key}: grid {grid} × patch_size {patch} does not give frames, height, width = "
            f"{[meta['frames'], meta['height'], meta['width']]}"
        )
    if meta["kind"] not in KINDS:
        raise ValueError(f"sample {key}: kind {meta['kind']!r}, expected one of {KINDS}")
    return meta


def decode_sample(members: dict[str, Any]) -> Sample:
    """Rebuild a `Sample` from tar members {suffix: bytes} (webdataset's `__key__`/`__url__` ignored).

    The frames are the exact uint8 pixels given to `encode_sample`, as a (C, T, H, W) tensor.
    """
    import torch

    from models.layers import unpatchify

    meta = decode_meta(members)
    key = meta["key"]
    suffix = PATCHES_ZSTD if meta["compression"] == "zstd" else PATCHES
    other = PATCHES if suffix == PATCHES_ZSTD else PATCHES_ZSTD
    if suffix not in members or other in members:
        raise ValueError(
            f"sample {key}: compression {meta['compression']!r} needs member {key}.{suffix} alone "
            f"(members: {_member_names(members)})"
        )
    grid, patch = tuple(meta["grid"]), tuple(meta["patch_size"])
    shape = (math.prod(grid), math.prod(patch) * CHANNELS)
    data = members[suffix]
    if suffix == PATCHES_ZSTD:
        data = _unzstd(data, f"{key}.{suffix}", math.prod(shape) + 4096)  # the array plus its header
    tokens = load_npy(data, f"{key}.{suffix}", np.uint8, shape)
    frames = unpatchify(torch.from_numpy(tokens)[None], grid, patch)[0]  # (C, T, H, W)

    text = None
    info = meta.get("text_embedding")
    if info is not None:
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (isinstance(shape, list) and _is_dims(shape, 2)):
            raise ValueError(f"sample {key}: bad text_embedding info {info!r}")
        if TEXT not in members:
            raise ValueError(f"sample {key}: missing member {key}.{TEXT} (members: {_member_names(members)})")
        text = torch.from_numpy(load_npy(members[TEXT], f"{key}.{TEXT}", np.float16, tuple(shape)))
    elif TEXT in members:
        raise ValueError(f"sample {key}: member {key}.{TEXT} present but the JSON has no text_embedding")
    return Sample(key=key, frames=frames, meta=meta, text=text)


def webdataset_decoder(key: str, data: bytes) -> Any:
    """A stock `webdataset` decode handler for Tessera members, `.decode(webdataset_decoder)`: the
    patches as a uint8 (T'·H'·W', pt·ph·pw·C) array, zstd-compressed or not, the text embedding as
    float16 and the JSON as a dict (arrays are loaded without pickle); None for any other member."""
    name = key.lower()
    if name.endswith(".json") or name == JSON:
        return json.loads(bytes(data).decode("utf-8"))
    if name.endswith(".npy.zst"):
        data = _unzstd(data, key, None)
    elif not name.endswith(".npy"):
        return None
    return np.load(io.BytesIO(data), allow_pickle=False)


def load_npy(data: bytes, name: str, dtype: np.dtype | type, shape: tuple[int, ...]) -> np.ndarray:
    """Load a `.npy` member after checking its header (dtype, shape, C order); never unpickles."""
    fp = io.BytesIO(data)
    if not bytes(data[:6]) == _NPY_MAGIC:
        raise ValueError(f"{name}: not a .npy array (bad magic)")
    try:
        major, _ = np.lib.format.read_magic(fp)
        read_header = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}
        if major not in read_header:
            raise ValueError(f"unsupported .npy version {major}")
        got_shape, fortran, got_dtype = read_header[major](fp)
    except ValueError as exc:
        raise ValueError(f"{name}: bad .npy header: {exc}") from None
    if got_dtype.hasobject:
        raise ValueError(f"{name}: object dtype (pickled) arrays are refused")
    if got_dtype != np.dtype(dtype) or tuple(got_shape) != tuple(shape) or fortran:
        raise ValueError(
            f"{name}: expected a C-order {np.dtype(dtype)} array of shape {tuple(shape)}, got "
            f"{got_dtype} {tuple(got_shape)}{' (Fortran order)' if fortran else ''}"
        )
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:  # truncated data
        raise ValueError(f"{name}: {exc}") from None


# --------------------------------------------------------------------------------------------------
# Shards: write / read
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    """What the manifest records for a written shard."""

    name: str
    samples: int
    sha256: str
    bytes: int


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> ShardInfo:
    """Write samples [(key, {suffix: bytes})] as a deterministic POSIX (ustar) tar, atomically.

    Members follow the given sample order, each sample's members in sorted suffix order, with mtime 0,
    uid/gid 0, empty owner names and mode 0o644: the same input gives the same bytes. It is written
    through `stages.atomic.atomic_path`: on any error no file appears at `path`.
    """
    path = Path(path)
    seen: set[str] = set()
    for key, members in samples:
        check_key(key)
        if key in seen:
            raise ValueError(f"shard {path.name}: duplicate sample key {key}")
        seen.add(key)
        for suffix in members:
            if not _MEMBER_RE.fullmatch(f"{key}.{suffix}"):
                raise ValueError(f"shard {path.name}: bad member suffix {suffix!r} of sample {key}")
    with (
        atomic_path(path) as tmp,
        open(tmp, "wb") as f,
        tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for key, members in samples:
            for suffix in sorted(members):
                data = bytes(members[suffix])
                tar.addfile(_tarinfo(f"{key}.{suffix}", len(data)), io.BytesIO(data))
    return ShardInfo(
        name=path.name, samples=len(samples), sha256=sha256_file(path), bytes=path.stat().st_size
    )


def read_shard(path: Path | str) -> Iterator[dict[str, Any]]:
    """Yield the samples of a shard as {"__key__": key, "__url__": path, suffix: bytes, ...} in order."""
    with open(path, "rb") as f:
        yield from iter_tar_samples(f, str(path))


def iter_tar_samples(fileobj: IO[bytes], name: str) -> Iterator[dict[str, Any]]:
    """Group a tar stream's members by key (streaming; shared by `read_shard` and the loader).

    Nothing is skipped silently: a non-file member, a name that is not `key.suffix`, a repeated
    suffix or a key that reappears after other keys raises ValueError naming the shard.
    """
    current: dict[str, Any] | None = None
    done: set[str] = set()
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for info in tar:
                match = _MEMBER_RE.fullmatch(info.name)
                if not info.isreg() or match is None:
                    raise ValueError(
                        f"shard {name}: member {info.name!r} is not a regular file named key.suffix "
                        "(key of [a-z0-9_])"
                    )
                key, suffix = match.groups()
                if current is None or current["__key__"] != key:
                    if current is not None:
                        done.add(current["__key__"])
                        yield current
                    if key in done:
                        raise ValueError(f"shard {name}: members of sample {key} are not contiguous")
                    current = {"__key__": key, "__url__": name}
                if suffix in current:
                    raise ValueError(f"shard {name}: duplicate member {info.name}")
                current[suffix] = tar.extractfile(info).read()
    except tarfile.TarError as exc:
        raise ValueError(f"shard {name}: unreadable tar: {exc}") from None
    if current is not None:
        yield current


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _zstd() -> Any:
    import zstandard  # imported when used: uncompressed shards need no zstd

    return zstandard


def _unzstd(data: bytes, name: str, max_bytes: int | None) -> bytes:
    """zstd-decompressed bytes, at most `max_bytes` (a corrupt or hostile frame cannot blow up memory)."""
    zstd, data = _zstd(), bytes(data)
    try:
        size = zstd.frame_content_size(data)  # -1 when the frame does not declare it
        if max_bytes is not None and size > max_bytes:
            raise zstd.ZstdError(f"it declares {size} bytes, more than the {max_bytes} expected")
        return zstd.ZstdDecompressor().decompress(data, max_output_size=max_bytes or 0)
    except zstd.ZstdError as exc:
        raise ValueError(f"{name}: not a valid zstd frame: {exc}") from None


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _check_patch(patch: tuple[int, int, int], key: str) -> tuple[int, int, int]:
    if len(patch) != 3 or not _is_dims(list(patch)):
        raise ValueError(f"sample {key}: patch must be three positive ints (pt, ph, pw), got {patch}")
    return int(patch[0]), int(patch[1]), int(patch[2])


def _check_meta(meta: dict[str, Any], key: str) -> None:
    missing = sorted(set(META_FIELDS) - set(meta))
    reserved = sorted(set(meta) & (set(_DERIVED_FIELDS) | {"text_embedding", "compression"}))
    if missing or reserved:
        raise ValueError(
            f"sample {key}: meta must hold {sorted(META_FIELDS)} (missing {missing}) and none of the "
            f"derived fields (given {reserved})"
        )
    for name, kind in META_FIELDS.items():
        if isinstance(meta[name], bool) or not isinstance(meta[name], kind):
            raise ValueError(f"sample {key}: meta[{name!r}] = {meta[name]!r} has the wrong type")
    if meta["kind"] not in KINDS:
        raise ValueError(f"sample {key}: kind {meta['kind']!r}, expected one of {KINDS}")
    if not all(math.isfinite(meta[n]) for n in ("fps", "start_s", "end_s")) or meta["fps"] < 0:
        raise ValueError(f"sample {key}: fps, start_s, end_s must be finite (fps >= 0)")


def _is_dims(values: list[Any], n: int = 3) -> bool:
    return len(values) == n and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


def _describe(x: Any) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__


def _member_names(members: dict[str, Any]) -> list[str]:
    return sorted(k for k in members if not k.startswith("__"))
