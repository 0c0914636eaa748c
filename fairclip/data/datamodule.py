"""Lightning DataModule over WebDataset shards (train + labelled eval split)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from fairclip.data.attribute_captions import AttributeCaptions
from fairclip.data.keep import kept_shards, read_keep_list
from fairclip.data.samples import Collate, SampleDecoder
from fairclip.data.shards import list_shards
from fairclip.data.stream import ShardStream, stream_loader

log = logging.getLogger(__name__)


class TrainShardBalancer(Protocol):
    """Balanced train shards from ``data.train_shards`` (``fairclip.balance.ShardBalancer``)."""

    def write(self, input_spec: Any) -> Path: ...

    def output(self, input_spec: Any) -> Path: ...


class ShardDataModule(L.LightningDataModule):
    """Train and eval loaders over WebDataset shards.

    ``preprocess_train``/``preprocess_val``/``tokenizer`` come from the model
    (:func:`fairclip.training.build` passes them), so the data always matches the model.
    With a ``balancer`` (``balance=m4|group``), global rank 0 writes the balanced train shards
    in ``prepare_data`` (the output sits beside the input, on storage every node sees) while the
    other ranks wait at Lightning's barrier; ``setup`` then trains every rank on them.
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
        balancer: TrainShardBalancer | None = None,
        captions: Mapping[str, Any] | None = None,
        keep: str | None = None,
    ) -> None:
        super().__init__()
        self.balancer = balancer
        self.prepare_data_per_node = False  # one writer per job: the output is shared storage
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
        # label-only shards (FairFace, UTKFace, CelebA) get captions written from their labels
        self.captions = (
            None
            if captions is None
            else AttributeCaptions.from_config(captions, self.attributes, "data.captions")
        )
        self.keep = keep  # a keep list (fairclip-balance): train on its kept keys only
        self.train_stream: ShardStream | None = None
        self.val_stream: ShardStream | None = None
        self.resume_state: dict[str, Any] | None = None  # from a mid-epoch checkpoint

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
            captions=self.captions,
        )
        if not train:  # validation runs only after the first epoch: check its labels now
            decode.check_labels(spec, key)
        shards, keep = list_shards(spec, key), None
        if train and self.keep is not None:
            keep = read_keep_list(self.keep)
            shards = kept_shards(shards, keep)
            log.info("data.keep: training on %d kept samples of %s", len(keep), spec)
        return ShardStream(
            shards,
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
            keep=keep,
        )

    def prepare_data(self) -> None:
        if self.balancer is not None and self.train_shards is not None:
            self.balancer.write(self.train_shards)

    def setup(self, stage: str | None = None) -> None:
        trainer = getattr(self, "trainer", None)
        if stage in (None, "fit") and self.balancer is not None and self.train_shards is not None:
            self.train_shards = str(self.balancer.output(self.train_shards))
            self.balancer = None  # balanced once: a second setup keeps these shards
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

    def _loader(
        self, stream: ShardStream, epoch_source: Callable[[], int] | None = None
    ) -> DataLoader:
        return stream_loader(
            stream, self.num_workers, torch.cuda.is_available(), epoch_source=epoch_source
        )

    def train_dataloader(self) -> DataLoader:
        """Each pass reads the trainer's epoch at its first batch (see StreamLoader)."""
        if self.train_stream is None:
            raise RuntimeError("data.train_shards is not set: nothing to train on")
        trainer = getattr(self, "trainer", None)
        self._resume_train_stream()
        epoch_source = (lambda: trainer.current_epoch) if trainer is not None else None
        return self._loader(self.train_stream, epoch_source)

    def _resume_train_stream(self) -> None:
        """Continue the checkpoint's epoch after its trained batches, if the data layout that
        fixes the batch order is unchanged (else the epoch restarts, with a warning)."""
        stream = self.train_stream
        if stream is None:
            return  # applied when the stream exists (the checkpoint may come first)
        state, self.resume_state = self.resume_state, None
        if state is None or state.get("train_epoch_finished", False):
            return  # nothing to resume: Lightning starts the next epoch
        layout = stream.layout()
        if state.get("train_layout") != layout:
            changed = sorted(k for k in layout if layout[k] != state.get("train_layout", {}).get(k))
            log.warning(
                "data: the checkpoint stopped epoch %d after %d batches, but %s changed since "
                "(%s now), so the epoch restarts from its first batch",
                state["train_epoch"],
                state["train_batches"],
                ", ".join(changed),
                {k: layout[k] for k in changed},
            )
            return
        stream.resume(state["train_epoch"], state["train_batches"])
        # Lightning looks for resumable state on the DataLoader only and would warn that a
        # mid-epoch resume replays data; this stream resumes from the checkpoint instead.
        warnings.filterwarnings(
            "ignore", "You're resuming from a checkpoint that ended before the epoch ended"
        )

    def state_dict(self) -> dict[str, Any]:
        """Where the training pass stands (saved in every checkpoint): the epoch and the batches
        of it already trained, so a resumed run continues the epoch (see ShardStream.resume)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        state = {
            "train_epoch": trainer.current_epoch,
            "train_batches": done,
            "train_epoch_finished": done >= trainer.num_training_batches,
        }
        if self.train_stream is not None:
            state["train_layout"] = self.train_stream.layout()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resume_state = dict(state_dict) if "train_epoch" in state_dict else None
        self._resume_train_stream()  # the loader may exist already: its workers start later

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_stream) if self.val_stream is not None else []

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()
