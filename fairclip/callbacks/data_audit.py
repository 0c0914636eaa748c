"""Record which sample keys each rank trained on, per epoch.

Why: data splitting bugs under DDP (two ranks reading the same shard, a worker replaying a
shard) silently bias training and are invisible in the loss. The audit files let a user (and
the tests) check that ranks saw disjoint data and how much of the set each epoch covered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from fairclip.files import atomic_write_text


class SeenKeysAudit(L.Callback):
    """Write ``<dirpath>/rank{r}-epoch{e}.txt`` with the keys of the training samples seen."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.keys: list[str] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.keys = []

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.keys.extend(batch["key"])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.dirpath / f"rank{trainer.global_rank}-epoch{trainer.current_epoch}.txt"
        atomic_write_text(path, "\n".join(self.keys) + "\n")
