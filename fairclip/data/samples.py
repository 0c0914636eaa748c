"""Per-sample decoding and batch collation, shared by the trainer's and evaluation's loaders.

Kept apart from the DataModule so that loader workers (started from a forkserver, see
:func:`fairclip.data.stream.worker_context`) unpickle them without importing Lightning, which
costs seconds per worker and starts a thread in the forkserver.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from fairclip.data.attribute_captions import AttributeCaptions
from fairclip.data.shards import IMAGE_EXTENSIONS, iter_members
from fairclip.data.stream import CorruptSample

log = logging.getLogger(__name__)


class SampleDecoder:
    """Turn a raw WebDataset sample into an image tensor, a caption and label indices.

    Attribute values and concepts are mapped to indices with the vocabularies from config;
    a value outside them is a *data definition* error (wrong config or wrong labels), so it
    raises with the shard, key and field instead of being silently skipped. An image that
    cannot be decoded or a missing caption is a *corrupt sample*: skipped and counted.
    """

    def __init__(
        self,
        preprocess: Callable[[Image.Image], torch.Tensor],
        attributes: dict[str, Sequence[str]],
        concepts: Sequence[str],
        label_key: str = "concept",
        require_caption: bool = True,
        captions: AttributeCaptions | None = None,
    ) -> None:
        self.preprocess = preprocess
        self.captions = captions
        self.attributes = {a: {v: i for i, v in enumerate(vals)} for a, vals in attributes.items()}
        self.concepts = {c: i for i, c in enumerate(concepts)}
        self.label_key = label_key
        self.require_caption = require_caption

    def __call__(self, sample: dict) -> dict:
        where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')!r}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            raise CorruptSample(f"no image (expected one of {IMAGE_EXTENSIONS})")
        try:
            image = Image.open(io.BytesIO(sample[ext])).convert("RGB")
        except Exception as err:  # PIL raises many types for bad bytes
            raise CorruptSample(f"undecodable {ext}: {err}") from err
        try:
            caption = sample.get("txt", b"").decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise CorruptSample(f"caption (txt) is not UTF-8: {err}") from err
        meta = self._parse(sample.get("json"), where)
        labels = self._indices(meta, where)  # a value outside the vocabularies raises first
        if not caption and self.captions is not None:
            try:
                caption = self.captions.caption(meta, where)
            except ValueError as err:  # a label the template needs is missing or has no phrase
                raise CorruptSample(f"no caption (txt) and none from data.captions: {err}") from err
        if self.require_caption and not caption:
            raise CorruptSample("missing caption (txt)")
        return {
            "image": self.preprocess(image),
            "text": caption,
            "key": sample["__key__"],
            **labels,
        }

    @staticmethod
    def _parse(raw: bytes | None, where: str) -> dict[str, Any]:
        if raw is None:
            return {}
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{where}: malformed JSON label ({err.msg} at char {err.pos})"
            ) from err
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: JSON label must be an object, got {type(meta).__name__}")
        return meta

    def _indices(self, meta: dict[str, Any], where: str) -> dict:
        groups = []
        for attr, vocab in self.attributes.items():
            value = meta.get(attr)
            if value is not None and value not in vocab:
                raise ValueError(
                    f"{where}: field {attr!r}={value!r} is not in data.attributes.{attr}={list(vocab)}"
                )
            groups.append(vocab.get(value, -1))
        concept = meta.get(self.label_key)
        if concept is not None and concept not in self.concepts:
            raise ValueError(
                f"{where}: field {self.label_key!r}={concept!r} is not in data.concepts={list(self.concepts)}"
            )
        return {"groups": groups, "concept": self.concepts.get(concept, -1)}

    def check_labels(self, spec: Any, config_key: str) -> dict[str, int]:
        """Check every JSON label of the shards ``spec`` up front; return samples per field.

        Training validates only at the end of its first epoch, so a label outside the
        vocabularies would otherwise surface an epoch in; this reads the JSON members alone
        (no image decode) and raises with the shard, key and field. A configured field that no
        sample carries, most often a misspelled key, would read as "unlabelled" everywhere: it
        is logged with the fields the labels do have.
        """
        counts = dict.fromkeys([*self.attributes, self.label_key], 0)
        found: set[str] = set()
        for url, key, raw in iter_members(spec, "json", config_key):
            meta = self._parse(raw, f"{url}: sample {key!r}")
            self._indices(meta, f"{url}: sample {key!r}")
            found.update(meta)
            for field in counts.keys() & meta.keys():
                counts[field] += 1
        absent = [f for f, n in counts.items() if n == 0 and (f != self.label_key or self.concepts)]
        if absent:
            log.warning(
                "%s=%r: no sample's JSON label has the field(s) %s, so every sample counts as "
                "unlabelled for them; the labels have %s (a misspelled key in data.attributes or "
                "label_key?)",
                config_key,
                spec,
                absent,
                sorted(found),
            )
        return counts


class Collate:
    """Stack images, tokenize captions (in the worker), gather labels."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict]) -> dict:
        return {
            "image": torch.stack([s["image"] for s in samples]),
            "text": self.tokenizer([s["text"] for s in samples]),
            "concept": torch.tensor([s["concept"] for s in samples], dtype=torch.long),
            "groups": torch.tensor([s["groups"] for s in samples], dtype=torch.long),
            "key": [s["key"] for s in samples],
        }


class CaptionCollate(Collate):
    """:class:`Collate` plus ``has_text``: eval sets may lack captions (recall skips those)."""

    def __call__(self, samples: list[dict]) -> dict:
        out = super().__call__(samples)
        out["has_text"] = torch.tensor([bool(s["text"]) for s in samples], dtype=torch.bool)
        return out
