"""The fairclip-eval bias evaluation as a Lightning callback at the end of training.

Why a callback and not a second job: the report then always matches the exact weights the
run ends with, lands in the run dir, and goes to the run's wandb logger. Under DDP every rank
encodes its share of the eval shards and the torchmetrics states are synced, so the cost per
rank shrinks with the world size; rank 0 writes the files.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from fairclip.eval.run import evaluate_model
from fairclip.eval.spec import EvalSpec, resolve_splits
from fairclip.metrics import TARGETS
from fairclip.report import log_report, write_report

log = logging.getLogger(__name__)


class BiasEvalCallback(L.Callback):
    """Evaluate ``pl_module.model`` with a prompt set on fit end; write ``dirpath/report.*``.

    The module must expose ``model`` (``encode_image``/``encode_text``), ``tokenizer``,
    ``preprocess_val``, ``attributes`` and ``concepts`` (as :class:`FairCLIPModule` does).
    The prompt set is checked against the module's vocabularies in ``setup``, so a bad
    config fails before training rather than after it.
    """

    def __init__(
        self,
        prompts: Mapping[str, Any],
        eval_shards: Any,
        dirpath: str | Path,
        neutral_shards: Any = "auto",
        skew_ks: Sequence[int] = (10, 50),
        recall_ks: Sequence[int] = (1, 5, 10),
        targets: Sequence[str] = TARGETS,
        require_all_groups: bool = True,
        label_key: str = "concept",
        batch_size: int = 256,
        num_workers: int = 0,
        plots: bool = True,
        log_wandb: bool = True,
        progress: bool = False,
    ) -> None:
        self.prompts = dict(prompts)
        self.eval_shards, self.neutral_shards = eval_shards, neutral_shards
        self.dirpath = Path(dirpath)
        self.skew_ks, self.recall_ks, self.targets = list(skew_ks), list(recall_ks), list(targets)
        self.require_all_groups, self.label_key = require_all_groups, label_key
        self.batch_size, self.num_workers = batch_size, num_workers
        self.plots, self.log_wandb, self.progress = plots, log_wandb, progress
        self.spec: EvalSpec | None = None
        self.report: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.spec = EvalSpec.from_config(
            self.prompts,
            pl_module.attributes,
            pl_module.concepts,
            skew_ks=self.skew_ks,
            recall_ks=self.recall_ks,
            targets=self.targets,
            require_all_groups=self.require_all_groups,
            label_key=self.label_key,
            key="callbacks.bias_eval.prompts",
        )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.spec is not None
        report = evaluate_model(
            pl_module.model,
            pl_module.tokenizer,
            pl_module.preprocess_val,
            self.spec,
            resolve_splits(self.eval_shards, self.neutral_shards),
            device=pl_module.device,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            progress=self.progress and trainer.is_global_zero,
        )
        report["model"] = {
            "spec": f"end of training ({getattr(pl_module, 'model_name', '?')})",
            "name": getattr(pl_module, "model_name", type(pl_module.model).__name__),
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
        }
        self.report = report
        if not trainer.is_global_zero:
            return
        files = write_report(report, self.dirpath, plots=self.plots)
        log.info("bias report written to %s", files["json"])
        if self.log_wandb:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    log_report(logger.experiment, report, files)
