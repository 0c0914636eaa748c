"""Training on a keep list (``data.keep``): a subset of the shards' samples, chosen by key,
without rewriting the shards.

Why counts first: the stream's epoch plan needs each shard's sample count to give every rank
and worker the same number of batches (:mod:`fairclip.data.stream`). With a keep list those
are the kept counts, found by scanning the shards' tar headers once (no member is read); the
stream then drops the samples not in the list before decoding them.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import pyarrow.parquet as pq

from fairclip.data.shards import Shard

# webdataset's sample key: the member path up to the first dot of its file name
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.][^/]*$")


def read_keep_list(path: str | Path, where: str = "data.keep") -> frozenset[str]:
    """The kept keys of a keep list (parquet with ``key`` and ``keep`` columns)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{where}={str(path)!r}: no keep list there")
    table = pq.read_table(p)
    if not {"key", "keep"} <= set(table.column_names):
        raise ValueError(
            f"{where}={str(path)!r}: expected columns key, keep (fairclip-balance writes them), "
            f"got {table.column_names}"
        )
    return frozenset(table.column("key").filter(table.column("keep")).to_pylist())


def shard_keys(url: str) -> list[str]:
    """The sample keys of one tar shard, in order (headers only)."""
    keys: list[str] = []
    with tarfile.open(url) as tar:
        for member in tar:
            match = _KEY.match(member.name) if member.isfile() else None
            if match and (not keys or keys[-1] != match.group(1)):
                keys.append(match.group(1))
    return keys


def kept_shards(shards: list[Shard], keep: frozenset[str], where: str = "data.keep") -> list[Shard]:
    """``shards`` with their kept sample counts; shards with none are left out. Every kept
    key must be in a shard: a list made for other shards is an error, not a smaller epoch."""
    out, found = [], 0
    for shard in shards:
        n = sum(1 for key in shard_keys(shard.url) if key in keep)
        found += n
        if n:
            out.append(Shard(shard.url, n))
    if found < len(keep):
        raise ValueError(
            f"{where}: {len(keep) - found} of its {len(keep)} kept keys are in none of the "
            f"{len(shards)} shard(s) (a keep list made for other shards?)"
        )
    if found > len(keep):
        raise ValueError(f"{where}: {found - len(keep)} kept key(s) occur in more than one shard")
    return out
