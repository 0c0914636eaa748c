"""Decoded batches of a labelled shard split in one process, for small fitting and scoring
runs (training reads through the DataModule)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from fairclip.data.samples import CaptionCollate, SampleDecoder
from fairclip.data.shards import list_shards
from fairclip.data.stream import ShardStream


def iter_batches(
    shards: Any,
    preprocess: Callable,
    tokenizer: Callable,
    attributes: Mapping[str, Sequence[str]],
    concepts: Sequence[str],
    batch_size: int = 256,
    max_samples: int | None = None,
    label_key: str = "concept",
    key: str = "shards",
) -> Iterator[dict]:
    """Decoded batches (image, tokenised text, groups, concept) of a labelled shard split, in
    one process (small helper runs; training uses the DataModule)."""

    decode = SampleDecoder(
        preprocess,
        {a: list(v) for a, v in attributes.items()},
        list(concepts),
        label_key,
        require_caption=False,
    )
    stream = ShardStream(
        list_shards(shards, key), decode, CaptionCollate(tokenizer), batch_size, train=False
    )
    seen = 0
    for batch in stream:
        if max_samples is not None and seen >= max_samples:
            break
        if max_samples is not None and seen + len(batch["key"]) > max_samples:
            keep = max_samples - seen
            batch = {
                k: v[:keep] if isinstance(v, list) or getattr(v, "ndim", 0) > 0 else v
                for k, v in batch.items()
            }
        seen += len(batch["key"])
        yield batch
