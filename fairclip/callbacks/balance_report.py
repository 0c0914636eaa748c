"""The M4/group balance report of the shards a run trains on, in the run's loggers."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from fairclip.balance.pipeline import report_dir


class BalanceReport(L.Callback):
    """Log the balance report (data RB/AB before/after, the P(label | group) plot, the kept
    fraction) once the datamodule has set up its balanced train shards."""

    @rank_zero_only
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.datamodule is None:
            return
        balanced = Path(trainer.datamodule.train_shards)
        folder = report_dir(balanced)
        report = json.loads((folder / "balance_report.json").read_text())
        rows = [[name, b["rb"], b["ab"]] for name, b in report["data_bias"].items()]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("balance/data_bias", columns=["stage", "RB", "AB"], data=rows)
                logger.log_image("balance/rates", [str(folder / "balance_rates.png")])
            logger.log_hyperparams(
                {"balance/kept_fraction": report["kept_fraction"], "balance/output": str(balanced)}
            )
