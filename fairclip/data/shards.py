"""WebDataset shard schema, atomic writing and shard discovery.

Schema (DESIGN.md): each sample has ``__key__``, an image (``jpg``/``png``/``webp``), a
``txt`` caption and a ``json`` dict of attribute labels. ``sizes.json`` beside the shards maps
shard file name -> sample count; readers use it for epoch lengths and per-rank splitting.
Every file is written to a temporary name and renamed, so an interrupted write never leaves a
truncated shard or report behind.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from braceexpand import braceexpand
from tqdm import tqdm

from fairclip.files import atomic_write_text

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SIZES_FILE = "sizes.json"


@dataclass(frozen=True)
class Shard:
    """A tar shard and its sample count."""

    url: str
    size: int


def write_shards(
    samples: Iterable[dict],
    out_dir: str | Path,
    prefix: str,
    shard_size: int = 1000,
    total: int | None = None,
    progress: bool = True,
) -> list[Shard]:
    """Write samples to ``out_dir/{prefix}-{i:06d}.tar`` and record counts in ``sizes.json``.

    Each shard is written as ``.tar.tmp`` and renamed when complete; ``sizes.json`` is merged
    with any existing entries (other splits may share the folder) and written last. Shards of
    the same prefix left by an earlier, larger write are removed with their entries: kept,
    they would mix two datasets in one split.
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size={shard_size}: expected a positive number of samples")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[Shard] = []
    writer: wds.TarWriter | None = None
    tmp_path = final_path = None
    count = 0

    def close() -> None:
        if writer is not None:
            writer.close()
            os.replace(tmp_path, final_path)
            shards.append(Shard(str(final_path), count))

    bar = tqdm(
        samples,
        total=total,
        desc=f"writing {prefix} shards",
        disable=None if progress else True,
        unit="img",
    )
    for sample in bar:
        if writer is None or count >= shard_size:
            close()
            final_path = out / f"{prefix}-{len(shards):06d}.tar"
            tmp_path = final_path.with_suffix(".tar.tmp")
            writer = wds.TarWriter(str(tmp_path))
            count = 0
        writer.write(sample)
        count += 1
    close()
    sizes_path = out / SIZES_FILE
    sizes = json.loads(sizes_path.read_text()) if sizes_path.exists() else {}
    written = {Path(s.url).name for s in shards}
    stale = sorted(p for p in out.glob(f"{prefix}-[0-9]*.tar") if p.name not in written)
    for path in stale:
        sizes.pop(path.name, None)
        path.unlink()
    if stale:
        log.warning("%s: removed %d %s shard(s) of an earlier write", out, len(stale), prefix)
    sizes.update({Path(s.url).name: s.size for s in shards})
    atomic_write_text(sizes_path, json.dumps(sizes, indent=1, sort_keys=True))
    return shards


def _read_sizes(path: Path, config_key: str) -> dict:
    """``sizes.json`` ({shard name: samples}), or {} when there is none (then tars are counted)."""
    if not path.exists():
        return {}
    try:
        sizes = json.loads(path.read_text())
    except json.JSONDecodeError:
        sizes = None
    if not isinstance(sizes, dict) or not all(isinstance(v, int) for v in sizes.values()):
        raise ValueError(
            f"{config_key}: {path} is not a {{shard name: sample count}} JSON object; "
            "fix it, or delete it to have the shards counted"
        )
    return sizes


def count_tar_samples(url: str) -> int:
    """Count distinct sample keys in a tar by reading headers only."""
    keys = set()
    with tarfile.open(url) as tar:
        for member in tar:
            if member.isfile() and "." in Path(member.name).name:
                keys.add(member.name.split(".", 1)[0])
    return len(keys)


def iter_members(
    spec: str | Path | list, suffix: str, config_key: str = "data.shards"
) -> Iterator[tuple[str, str, bytes]]:
    """``(shard url, sample key, bytes)`` of every ``.{suffix}`` member of the shards, in order.

    Reads only those members (tar headers are skipped over), so a caption corpus or a label
    check costs no image decode.
    """
    for shard in list_shards(spec, config_key):
        with tarfile.open(shard.url) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(f".{suffix}"):
                    yield shard.url, member.name[: -len(suffix) - 1], tar.extractfile(member).read()


def read_captions(spec: str | Path | list, n: int, config_key: str = "data.shards") -> list[str]:
    """The ``txt`` captions of the first ``n`` samples of the shards in ``spec`` (in order)."""
    out: list[str] = []
    for _, _, raw in iter_members(spec, "txt", config_key):
        out.append(raw.decode("utf-8").strip())
        if len(out) >= n:
            break
    return out


def list_shards(spec: str | Path | list, config_key: str = "data.shards") -> list[Shard]:
    """Resolve a shard spec to shards with sizes.

    ``spec`` is a directory (all ``*.tar`` in it), a brace pattern
    (``dir/train-{000000..000009}.tar``), a single tar, or a list of those. Sizes come from
    ``sizes.json`` beside the shards, else from scanning tar headers. Raises a clear error for
    a missing path or an empty shard, naming ``config_key``.
    """
    specs = spec if isinstance(spec, list | tuple) else [spec]
    urls: list[str] = []
    for item in specs:
        item = str(item)
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"{config_key}={item!r}: directory has no *.tar shards")
            urls += found
        else:
            urls += list(braceexpand(item))
    if not urls:
        raise ValueError(f"{config_key}={spec!r}: no shards given")
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{config_key}: {len(missing)} shard(s) not found, e.g. {missing[0]!r} "
            "(expected existing .tar files; generate them with `fairclip-data synthetic` or an adapter)"
        )
    sizes_cache: dict[Path, dict] = {}
    shards = []
    for url in urls:
        sizes_path = Path(url).parent / SIZES_FILE
        if sizes_path not in sizes_cache:
            sizes_cache[sizes_path] = _read_sizes(sizes_path, config_key)
        name = Path(url).name
        size = sizes_cache[sizes_path].get(name)
        if size is None:
            try:
                size = count_tar_samples(url)
            except tarfile.TarError as err:
                raise ValueError(
                    f"{config_key}: shard {url!r} is not a readable tar ({err}): truncated or "
                    "corrupt; regenerate it or remove it"
                ) from err
        if int(size) <= 0:
            raise ValueError(
                f"{config_key}: shard {url!r} is empty (0 samples); remove it or regenerate it"
            )
        shards.append(Shard(url, int(size)))
    return shards
