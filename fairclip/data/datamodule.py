"""Lightning DataModule over WebDataset shards (train + labelled eval split)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fairclip.data.shards import IMAGE_EXTENSIONS, list_shards
from fairclip.data.stream import CorruptSample, ShardStream, stream_loader


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
    ) -> None:
        self.preprocess = preprocess
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
        caption = sample.get("txt", b"").decode("utf-8").strip()
        if self.require_caption and not caption:
            raise CorruptSample("missing caption (txt)")
        labels = self._labels(sample.get("json"), where)
        return {
            "image": self.preprocess(image),
            "text": caption,
            "key": sample["__key__"],
            **labels,
        }

    def _labels(self, raw: bytes | None, where: str) -> dict:
        if raw is None:
            meta: dict[str, Any] = {}
        else:
            try:
                meta = json.loads(raw)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{where}: malformed JSON label ({err.msg} at char {err.pos})"
                ) from err
            if not isinstance(meta, dict):
                raise ValueError(
                    f"{where}: JSON label must be an object, got {type(meta).__name__}"
                )
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


class ShardDataModule(L.LightningDataModule):
    """Train and eval loaders over WebDataset shards.

    ``preprocess_train``/``preprocess_val``/``tokenizer`` come from the model
    (:func:`fairclip.train.build` passes them), so the data always matches the model.
    """

    def __init__(
        self,
        train_shards: str | list[str] | None,
        val_shards: str | list[str] | None,
        attributes: dict[str, list[str]],
        concepts: list[str],
        batch_size: int = 128,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        label_key: str = "concept",
        preprocess_train: Callable | None = None,
        preprocess_val: Callable | None = None,
        tokenizer: Callable | None = None,
    ) -> None:
        super().__init__()
        if not attributes:
            raise ValueError(
                "data.attributes: expected at least one attribute family, e.g. {gender: [female, male]}"
            )
        for attr, values in attributes.items():
            if not values:
                raise ValueError(f"data.attributes.{attr}: expected a non-empty list of values")
        for key, value in (
            ("batch_size", batch_size),
            ("val_batch_size", val_batch_size or batch_size),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"data.{key}={value!r}: expected a positive integer")
        self.train_shards, self.val_shards = train_shards, val_shards
        self.attributes, self.concepts = dict(attributes), list(concepts)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.resampled = num_workers, resampled
        self.samples_per_epoch, self.shuffle_buffer = samples_per_epoch, shuffle_buffer
        self.seed, self.label_key = seed, label_key
        self.preprocess_train, self.preprocess_val = preprocess_train, preprocess_val
        self.tokenizer = tokenizer
        self.train_stream: ShardStream | None = None
        self.val_stream: ShardStream | None = None

    def _stream(self, spec: Any, train: bool) -> ShardStream:
        if self.tokenizer is None or self.preprocess_train is None or self.preprocess_val is None:
            raise RuntimeError(
                "ShardDataModule needs preprocess_train/preprocess_val/tokenizer from the model"
            )
        key = "data.train_shards" if train else "data.val_shards"
        decode = SampleDecoder(
            self.preprocess_train if train else self.preprocess_val,
            self.attributes,
            self.concepts,
            self.label_key,
            require_caption=train,
        )
        return ShardStream(
            list_shards(spec, key),
            decode,
            Collate(self.tokenizer),
            self.batch_size if train else self.val_batch_size,
            train=train,
            num_workers=self.num_workers,
            seed=self.seed,
            resampled=self.resampled and train,
            samples_per_epoch=self.samples_per_epoch,
            shuffle_buffer=self.shuffle_buffer,
            config_key=key,
        )

    def setup(self, stage: str | None = None) -> None:
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if stage in (None, "fit") and self.train_shards is not None and self.train_stream is None:
            self.train_stream = self._stream(self.train_shards, train=True)
            self.train_stream.set_distributed(rank, world)
        if (
            stage in (None, "fit", "validate", "test")
            and self.val_shards is not None
            and self.val_stream is None
        ):
            self.val_stream = self._stream(self.val_shards, train=False)
            self.val_stream.set_distributed(rank, world)

    def _loader(self, stream: ShardStream) -> DataLoader:
        return stream_loader(stream, self.num_workers, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        if self.train_stream is None:
            raise RuntimeError("data.train_shards is not set: nothing to train on")
        trainer = getattr(self, "trainer", None)
        self.train_stream.set_epoch(trainer.current_epoch if trainer is not None else 0)
        return self._loader(self.train_stream)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_stream) if self.val_stream is not None else []

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()
