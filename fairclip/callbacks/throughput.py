"""Training throughput: Lightning's ``ThroughputMonitor`` counting ``batch["image"]`` rows.

Logged keys (Lightning's): ``train/device/samples_per_sec`` and ``train/device/batches_per_sec``
per rank, ``train/samples_per_sec`` and ``train/batches_per_sec`` over all ranks (only when
there is more than one), plus ``train/time``, ``train/batches`` and ``train/samples``; the same
under ``validate/`` for validation batches. Rates are wall time from one batch end to the next
(data wait + step), so they can be compared with open_clip's trainer.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities.rank_zero import rank_zero_only


def image_count(batch: dict[str, Any]) -> int:
    """Samples in a fairclip batch: its number of images."""
    return len(batch["image"])


class Throughput(ThroughputMonitor):
    """``ThroughputMonitor`` averaging each rate over the last ``every_n_steps`` batches.

    The window restarts at every training epoch, so the time between epochs (validation,
    checkpointing, data-loader workers starting again) never counts as a step; the first
    batch of an epoch only starts the clock. ``every_n_steps`` sets the window
    (``window_size = every_n_steps + 1`` timestamps); rates are logged whenever the trainer
    logs (``log_every_n_steps``) once the window is full.
    """

    def __init__(self, every_n_steps: int = 10, **kwargs: Any) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise ValueError(f"every_n_steps: expected a positive int, got {every_n_steps!r}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps: expected a positive int, got {every_n_steps}")
        kwargs.setdefault("batch_size_fn", image_count)
        super().__init__(window_size=every_n_steps + 1, **kwargs)
        self.every_n_steps = every_n_steps

    @rank_zero_only
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # ThroughputMonitor._start: while fitting it empties the window and restarts the clock
        self._start(trainer)
