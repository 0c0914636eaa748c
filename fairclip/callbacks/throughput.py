"""Training throughput (samples/s over all ranks), logged as ``train/samples_per_s``.

Measured like open_clip's trainer measures it: wall time from one batch start to the next
(data wait + step), averaged over ``every_n_steps`` steps, so the two can be compared.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class Throughput(L.Callback):
    def __init__(self, every_n_steps: int = 10) -> None:
        self.every_n_steps = every_n_steps
        self._start: float | None = None
        self._samples = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # epoch boundaries (validation, re-forked workers) are not steps
        self._start, self._samples = None, 0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.perf_counter()
        if self._start is None:  # the first batch of an epoch includes worker start-up
            self._start, self._samples = now, 0
            return
        self._samples += len(batch["image"]) * trainer.world_size
        if (batch_idx + 1) % self.every_n_steps == 0:
            pl_module.log(
                "train/samples_per_s", self._samples / (now - self._start), rank_zero_only=True
            )
            self._start, self._samples = now, 0
