"""Iterable WebDataset streams with exact, DDP-safe epoch lengths.

Why not plain ``wds.WebDataset(...).with_epoch(n)``: under DDP every rank must run the same
number of steps, or the job hangs in a collective, and without resampling no sample may be
seen twice in an epoch. Shard sizes are known (``sizes.json``), so every rank and worker can
compute the same deterministic plan on its own, without communication:

* train, non-resampled: shards are shuffled per epoch with ``(seed, epoch)``, dealt
  round-robin to ranks (``len(shards) % world`` shards sit out that epoch, a different set each
  epoch) and then to workers. The epoch length is a lower bound that holds for every rank in
  every epoch; each worker gets a batch quota so its rank yields exactly that many batches.
* train, resampled: each worker draws shards with replacement, seeded by (seed, epoch, rank,
  worker), and yields its quota of batches.
* eval: every sample exactly once over all ranks, split by global sample index.

Corrupt samples (undecodable image, missing caption) are skipped, logged and counted: each
batch carries ``skipped``, the number skipped since the previous batch of that worker.

Mid-epoch resume: because the plan is deterministic and the DataLoader takes one batch from
each worker in turn (workers that reached their quota drop out), the first ``n`` batches of an
epoch are known per worker. :meth:`ShardStream.resume` makes the next pass over that epoch
skip them (the workers read but do not decode them; :class:`StreamLoader` drops the few of the
cut round), so a resumed run continues with batch ``n + 1`` of the same epoch instead of
replaying it (exact unless corrupt samples were skipped before the cut: each one shifts that
worker by a sample).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import signal
from collections.abc import Callable, Iterator
from typing import NoReturn

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fairclip.data.shards import Shard

log = logging.getLogger(__name__)


class CorruptSample(Exception):
    """A sample that cannot be used for training (it is skipped and counted)."""


def worker_quotas(available: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` batches over workers, each at most its ``available`` batches."""
    if available.sum() < total:
        raise RuntimeError(f"cannot schedule {total} batches from {int(available.sum())} available")
    quota = available * total // max(int(available.sum()), 1)
    for w in np.argsort(-(available - quota), kind="stable")[: total - int(quota.sum())]:
        quota[w] += 1
    return quota


class ShardStream(IterableDataset):
    """Batches decoded from WebDataset shards; see the module docstring for the plan."""

    def __init__(
        self,
        shards: list[Shard],
        decode: Callable[[dict], dict],
        collate: Callable[[list[dict]], dict],
        batch_size: int,
        train: bool,
        num_workers: int = 0,
        seed: int = 0,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        config_key: str = "data",
        keep: frozenset[str] | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"{config_key}.batch_size={batch_size}: expected a positive integer")
        self.shards, self.decode, self.collate = shards, decode, collate
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.num_workers = max(num_workers, 1)
        self.resampled, self.samples_per_epoch = resampled, samples_per_epoch
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.config_key = config_key
        self.keep = keep  # data.keep: the shards' sizes are their kept counts
        self.rank, self.world_size, self.epoch = 0, 1, 0
        self.sizes = np.array([s.size for s in shards], dtype=np.int64)
        self.resume_point: tuple[int, int] | None = None  # (epoch, batches already trained)

    # -- configuration -----------------------------------------------------------------
    def set_distributed(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        if self.train and not self.resampled and len(self.shards) < world_size * self.num_workers:
            raise ValueError(
                f"{self.config_key}: {len(self.shards)} shard(s) for {world_size} rank(s) x "
                f"{self.num_workers} worker(s); non-resampled training needs at least one shard "
                "per worker per rank (write smaller shards, lower num_workers, or set resampled=true)"
            )
        len(self)  # fail early if an epoch would be empty

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def layout(self) -> dict[str, int | bool | None]:
        """What fixes the order of training batches (a resume point is valid only under the
        same layout)."""
        return {
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shards": len(self.shards),
            "resampled": self.resampled,
            "samples_per_epoch": self.samples_per_epoch,
            "shuffle_buffer": self.shuffle_buffer,
            "keep": None if self.keep is None else len(self.keep),
        }

    def resume(self, epoch: int, batches: int) -> None:
        """Start the pass over ``epoch`` after its first ``batches`` batches (a train stream
        restored from a mid-epoch checkpoint); passes over other epochs are unaffected."""
        if not self.train:
            raise ValueError(f"{self.config_key}: only a training stream resumes mid-epoch")
        self.resume_point = (int(epoch), max(int(batches), 0))

    def resume_split(self, quotas: np.ndarray) -> tuple[np.ndarray, int]:
        """How a resumed pass skips the epoch's first ``n`` batches: (batches each worker skips,
        reading but not decoding them; batches the loader then drops). Zeros when not resuming
        this epoch.

        The loader takes batches round-robin from the workers that have not reached their
        ``quotas``, always starting a pass at worker 0; so the workers skip whole rounds, and
        the batches of the cut round that were already trained (fewer than the number of
        workers) are produced again and dropped by :class:`StreamLoader`.
        """
        none = np.zeros_like(quotas), 0
        if self.resume_point is None or self.resume_point[0] != self.epoch:
            return none
        rounds = np.arange(int(quotas.max(initial=0)))[:, None]
        active = rounds < quotas[None, :]
        worker = np.broadcast_to(np.arange(len(quotas)), active.shape)[active]  # loader order
        round_of = np.broadcast_to(rounds, active.shape)[active]
        done = min(self.resume_point[1], len(worker))
        start = done if done == len(worker) else int(np.searchsorted(round_of, round_of[done]))
        return np.bincount(worker[:start], minlength=len(quotas)), done - start

    def train_quotas(self) -> np.ndarray:
        """Batches each worker of this rank yields in the current epoch."""
        if self.resampled:
            return worker_quotas(np.full(self.num_workers, len(self)), len(self))
        plan = self._train_plan()
        available = np.array([self.sizes[p].sum() // self.batch_size for p in plan])
        return worker_quotas(available, len(self))

    @property
    def total_samples(self) -> int:
        return int(self.sizes.sum())

    def __len__(self) -> int:
        b, w = self.batch_size, self.num_workers
        if not self.train:
            counts = self._eval_counts().reshape(self.world_size, w)[self.rank]
            return int(np.ceil(counts / b).sum())
        if self.resampled:
            samples = self.samples_per_epoch or self.total_samples
            n = samples // (b * self.world_size)
        else:
            per_rank = len(self.shards) // self.world_size
            lower_bound = int(np.sort(self.sizes)[:per_rank].sum())
            n = (lower_bound - w * (b - 1)) // b
        if n <= 0:
            raise ValueError(
                f"{self.config_key}: {self.total_samples} samples give no full batch of "
                f"{b} per rank ({self.world_size} rank(s), {w} worker(s)); lower the batch size"
            )
        return n

    # -- planning ----------------------------------------------------------------------
    def _train_plan(self) -> list[list[int]]:
        """Shard indices per worker of this rank for the current epoch."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.shards))
        per_rank = len(self.shards) // self.world_size
        mine = order[self.rank :: self.world_size][:per_rank]
        return [mine[w :: self.num_workers].tolist() for w in range(self.num_workers)]

    def _eval_counts(self) -> np.ndarray:
        """Samples per (rank, worker) under the global-index split, flattened rank-major."""
        offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        counts = np.zeros((self.world_size, self.num_workers), dtype=np.int64)
        for r in range(self.world_size):
            # number of i in [offset, offset + size) with i % world == r
            per_shard = (offsets + self.sizes - 1 - r) // self.world_size - (
                offsets - 1 - r
            ) // self.world_size
            for w in range(self.num_workers):
                counts[r, w] = per_shard[w :: self.num_workers].sum()
        return counts.reshape(-1)

    # -- iteration ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(
                f"stream planned for {self.num_workers} workers, loader has {info.num_workers}"
            )
        if not self.train:
            yield from self._batches(self._eval_samples(worker), quota=None)
            return
        if self.resampled:
            samples = self._resampled_samples(worker)
        else:
            samples = self._shard_samples(self._train_plan()[worker], worker, repeat=True)
        quotas = self.train_quotas()
        done = int(self.resume_split(quotas)[0][worker])
        samples = itertools.islice(samples, done * self.batch_size, None)  # read, not decoded
        yield from self._batches(samples, quota=int(quotas[worker]) - done)

    def _rng(self, worker: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, self.rank, worker])

    def _read(self, indices: list[int]) -> Iterator[dict]:
        urls = [{"url": self.shards[i].url} for i in indices]
        samples = wds.tarfile_to_samples(handler=self._tar_error)(iter(urls))
        if self.keep is None:
            yield from samples
        else:  # a sample off the keep list is dropped before it is decoded
            keep = self.keep
            yield from (sample for sample in samples if sample["__key__"] in keep)

    def _shard_samples(self, indices: list[int], worker: int, repeat: bool) -> Iterator[dict]:
        samples = self._read(indices)
        if self.shuffle_buffer > 1:
            seed = int(self._rng(worker).integers(2**31))
            samples = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer // 2, seed=seed)(samples)
        yield from samples
        # Skipped samples can leave a worker short of its quota: top up from the start of its
        # shards (a few repeats) rather than let ranks fall out of step and hang DDP.
        while repeat:
            yield from self._read(indices)

    def _resampled_samples(self, worker: int) -> Iterator[dict]:
        rng = self._rng(worker)
        while True:
            yield from self._shard_samples(
                rng.integers(0, len(self.shards), 8).tolist(), worker, False
            )

    def _eval_samples(self, worker: int) -> Iterator[dict]:
        offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        for j in range(worker, len(self.shards), self.num_workers):
            for pos, sample in enumerate(self._read([j])):
                if (offsets[j] + pos) % self.world_size == self.rank:
                    yield sample

    def _batches(self, samples: Iterator[dict], quota: int | None) -> Iterator[dict]:
        batch: list[dict] = []
        skipped = emitted = 0
        for sample in samples:
            if quota is not None and emitted >= quota:
                return
            try:
                batch.append(self.decode(sample))
            except CorruptSample as err:
                skipped += 1
                log.warning(
                    "skipping corrupt sample %s in %s: %s",
                    sample.get("__key__"),
                    sample.get("__url__"),
                    err,
                )
                continue
            if len(batch) == self.batch_size:
                yield self._finish(batch, skipped)
                batch, skipped, emitted = [], 0, emitted + 1
        if batch and quota is None:
            yield self._finish(batch, skipped)

    def _finish(self, batch: list[dict], skipped: int) -> dict:
        out = self.collate(batch)
        out["skipped"] = torch.tensor(skipped)
        return out

    def _tar_error(self, exn: Exception) -> NoReturn:
        """A tar that cannot be read (truncated, empty, not a tar) stops the run.

        Skipping it, as this did before, left a worker short of its quota, so the epoch was
        topped up with repeats and an evaluation silently reported on part of its split.
        Corrupt *samples* inside a readable tar are skipped and counted elsewhere.
        """
        text = " ".join(map(str, exn.args))
        shard = next((s.url for s in self.shards if s.url in text), "?")
        raise ValueError(
            f"{self.config_key}: shard {shard!r} is unreadable ({type(exn).__name__}: "
            f"{exn.args[0] if exn.args else exn}): truncated or not a tar. Regenerate it, or "
            "remove it and its entry in sizes.json."
        ) from exn


# Signals a Slurm step sends to *every* process of the job (``scancel --signal=USR1``,
# ``--signal=USR1@90`` before the time limit): meant for the trainer, they would kill the
# forkserver, its resource tracker and the loader workers, whose default action is to exit.
SLURM_JOB_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
# Imported once in the forkserver, so each worker starts in a fraction of a second, not the
# seconds of fresh imports: all that unpickling a stream needs, and Lightning, which a child
# imports again when it re-runs the main script (``fairclip-train``) as ``__mp_main__``. Their
# only threads are OpenBLAS's idle, fork-safe pools; no Python thread runs in the server.
FORKSERVER_PRELOAD = ["torch", "open_clip", "lightning", "fairclip.data.samples"]


def worker_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context of loader workers: a forkserver, not a fork of the trainer.

    Why: a fork taken while another trainer thread (wandb, gloo, Lightning) starts or ends can
    leave CPython's runtime lock held in the child, which then hangs for ever inside
    ``os.fork`` (seen in CI: a DDP rank stuck at its first validation, the other rank waiting
    in a collective). The forkserver is single-threaded, so its forks are safe. It is started
    with :data:`SLURM_JOB_SIGNALS` blocked (a blocked mask survives fork and exec), so the
    server, its resource tracker and every worker outlive a requeue signal sent to the whole
    job; only the trainer acts on it.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SLURM_JOB_SIGNALS)
    try:
        multiprocessing.forkserver.ensure_running()  # also starts the resource tracker
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return ctx


class StreamLoader(DataLoader):
    """A DataLoader over a :class:`ShardStream`. For training it starts its workers at the
    first batch of a pass, with the epoch ``epoch_source()`` gives then, and drops the batches
    a resumed pass produces again (see :meth:`ShardStream.resume_split`).

    Why the first batch, not ``iter()``: Lightning calls ``iter()`` on the train loader while
    it sets up, before a checkpoint's epoch is restored, and not again for the resumed epoch
    (nor does it call ``on_train_epoch_start`` when resuming mid-epoch). Workers started at
    ``iter()`` would get epoch 0's plan there.
    """

    def __init__(
        self, dataset: ShardStream, *, epoch_source: Callable[[], int] | None = None, **kwargs
    ) -> None:
        super().__init__(dataset, **kwargs)
        self.epoch_source = epoch_source

    def __iter__(self) -> Iterator[dict]:
        if not self.dataset.train:  # evaluation: one plan for every pass, nothing to resume
            return super().__iter__()
        return self._train_batches_from_first_request()

    def _train_batches_from_first_request(self) -> Iterator[dict]:
        stream = self.dataset
        if self.epoch_source is not None:
            stream.set_epoch(self.epoch_source())
        drop = stream.resume_split(stream.train_quotas())[1] if stream.resume_point else 0
        batches = super().__iter__()
        for _ in range(drop):
            next(batches)
        yield from batches


def stream_loader(
    stream: ShardStream,
    num_workers: int,
    pin_memory: bool = False,
    epoch_source: Callable[[], int] | None = None,
) -> DataLoader:
    """A DataLoader over a self-batching ``stream`` (``batch_size=None``), for training and
    evaluation alike. Workers are not persistent: re-created each pass, they see the epoch of
    ``epoch_source`` (the trainer's ``current_epoch``). They come from :func:`worker_context`."""
    return StreamLoader(
        stream,
        epoch_source=epoch_source,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        multiprocessing_context=worker_context() if num_workers > 0 else None,
    )
