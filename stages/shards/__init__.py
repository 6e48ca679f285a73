"""The shard format (schema version 2; version 1 read too) that preprocessing writes and training reads:
samples as losslessly patchified uint8 arrays, raw or zstd-compressed, with JSON metadata in POSIX tars
(`stages.shards.format`, docs/SHARDS.md).

The training loader that streams them, `stages.shards.loader`, is imported by its own name: it needs
torch, which this package (imported by decode child processes through preprocessing) must not load.
"""

from stages.shards.format import (
    SCHEMA_VERSION,
    Sample,
    ShardInfo,
    check_key,
    decode_meta,
    decode_sample,
    encode_sample,
    iter_tar_samples,
    load_npy,
    read_shard,
    sha256_file,
    write_shard,
)

__all__ = [
    "SCHEMA_VERSION",
    "Sample",
    "ShardInfo",
    "check_key",
    "decode_meta",
    "decode_sample",
    "encode_sample",
    "iter_tar_samples",
    "load_npy",
    "read_shard",
    "sha256_file",
    "write_shard",
]
