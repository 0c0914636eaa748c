"""Encoding an evaluation's two sides: every prompt once (:class:`TextSide`), and the image
splits as shard streams, with an optional cache of image passes shared by models whose image
encoder is the same."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fairclip.data.samples import CaptionCollate, SampleDecoder
from fairclip.data.shards import list_shards
from fairclip.data.stream import ShardStream
from fairclip.eval.spec import (
    SPLITS,
    EvalSpec,
)
from fairclip.model.encode import class_embeddings, encode_prompts, zero_shot_classifier


def eval_stream(
    shards: Any,
    key: str,
    spec: EvalSpec,
    preprocess: Callable,
    tokenizer: Callable,
    batch_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
) -> ShardStream:
    decode = SampleDecoder(
        preprocess, spec.attributes, spec.concepts, spec.label_key, require_caption=False
    )
    stream = ShardStream(
        list_shards(shards, key),
        decode,
        CaptionCollate(tokenizer),
        batch_size,
        train=False,
        num_workers=num_workers,
        config_key=key,
    )
    stream.set_distributed(rank, world_size)
    return stream


@dataclass
class TextSide:
    """Everything encoded from prompts, once per evaluation (unit-norm rows)."""

    queries: dict[str, Tensor]
    concepts: Tensor | None
    association: Tensor | None
    groups: dict[int, Tensor]  # attribute column -> [num values, D]


def encode_text_side(
    model: Any, tokenizer: Callable, spec: EvalSpec, device: torch.device
) -> TextSide:
    def classes(words: Sequence[str], templates: Sequence[str]) -> Tensor | None:
        if not words:
            return None
        return zero_shot_classifier(model, tokenizer, words, templates, device)

    names = list(spec.attributes)
    return TextSide(
        queries={
            qs.name: encode_prompts(model, tokenizer, qs.prompts, device) for qs in spec.query_sets
        },
        concepts=classes(spec.concepts, spec.zero_shot_templates),
        association=classes(spec.association_words, spec.association_templates),
        groups={
            names.index(attr): class_embeddings(model, tokenizer, list(per_value.values()), device)
            for attr, per_value in spec.group_prompts.items()
        },
    )


@dataclass
class ImageCache:
    """Image embeddings (with their batch's labels and captions) of whole evaluation passes.

    Why: the text-side rows of a comparison table (Orth-Proj, SEM, a text head) share the base
    model's image encoder, so every row after the first would decode and encode the same images
    again. The caller vouches that the models it shares a cache between embed images alike.
    """

    passes: dict[str, list[tuple[dict, Tensor]]] = field(default_factory=dict)


def split_passes(splits: Mapping[str, Any], used: set[str]) -> list[tuple[Any, list[str]]]:
    """One pass per distinct shard spec: a split given twice (neutral = eval) is read once."""
    passes: list[tuple[Any, list[str]]] = []
    for split in SPLITS:
        if split not in used:
            continue
        for shards, roles in passes:
            if shards == splits[split]:
                roles.append(split)
                break
        else:
            passes.append((splits[split], [split]))
    return passes
