"""`fairclip-train`: compose conf/train.yaml, build model + data + trainer, fit, export."""

from __future__ import annotations

import logging
import os
import signal
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from fairclip.balance.pipeline import ShardBalancer
from fairclip.callbacks.balance_report import BalanceReport
from fairclip.cluster import cluster_plugins, continue_csv_logs, resume_checkpoint
from fairclip.model.factory import export_open_clip
from fairclip.runtime import (
    hydra_mode,
    instantiate,
    instantiate_dict,
    isolate_rank_logs,
    rewrite_argv_for_ddp_children,
    stable_id,
)

log = logging.getLogger(__name__)


def _configure_wandb(cfg: DictConfig) -> None:
    """Stable wandb id per run dir (requeued jobs resume the same run), group per sweep."""
    wandb_cfg = OmegaConf.select(cfg, "logger.wandb")
    if not wandb_cfg:
        return
    if SLURMEnvironment.detect() and os.environ.pop("WANDB_SERVICE", None):
        # wandb hands its service token to child processes through this variable; a Slurm job
        # inherits it from whatever process ran sbatch (a notebook, a test, a sweep driver),
        # and logging into that foreign service hangs once it goes away. Start our own.
        log.info("ignoring WANDB_SERVICE inherited from the submitting process")
    with open_dict(wandb_cfg):
        if wandb_cfg.get("id") is None:
            wandb_cfg.id = stable_id(str(Path(cfg.paths.output_dir).resolve()))
        if wandb_cfg.get("group") is None and hydra_mode() == RunMode.MULTIRUN:
            wandb_cfg.group = Path(HydraConfig.get().sweep.dir).name
        wandb_cfg.setdefault("resume", "allow")


def build(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    """Instantiate module, datamodule and trainer from a composed config."""
    L.seed_everything(cfg.seed, workers=True)
    # balance=m4|group: rank 0 writes balanced shards in the datamodule's prepare_data (once;
    # later runs with the same settings reuse them), every rank trains on them
    balancing = bool(cfg.get("balance")) and cfg.balance.method != "none"
    module = instantiate(cfg, "module")
    datamodule = instantiate(
        cfg,
        "data",
        preprocess_train=module.preprocess_train,
        preprocess_val=module.preprocess_val,
        tokenizer=module.tokenizer,
        balancer=ShardBalancer(cfg.balance) if balancing else None,
    )
    _configure_wandb(cfg)
    loggers = instantiate_dict(cfg, "logger")
    callbacks = instantiate_dict(cfg, "callbacks")
    if balancing:
        callbacks.append(BalanceReport())
    plugins = instantiate(cfg, "trainer.plugins") if cfg.trainer.get("plugins") else []
    plugins, callbacks = cluster_plugins(plugins, callbacks)
    trainer = instantiate(
        cfg, "trainer", logger=loggers or False, callbacks=callbacks, plugins=plugins
    )
    return module, datamodule, trainer


def _stop_ddp_children(trainer: L.Trainer) -> None:
    """When the process that launched the local DDP ranks fails, stop them too. Lightning
    does so on Ctrl-C only; on any other error (e.g. rank 0 failing in prepare_data) the
    children would wait at the next barrier until the process-group timeout. Under srun,
    ``--kill-on-bad-exit=1`` (slurm/train.sbatch, hydra/launcher=slurm) does the same."""
    launcher = trainer.strategy.launcher
    if isinstance(launcher, _SubprocessScriptLauncher) and trainer.is_global_zero:
        launcher.kill(signal.SIGKILL)


@rank_zero_only
def _log_config(trainer: L.Trainer, cfg: DictConfig) -> None:
    container = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                 for k, v in cfg.items() if k != "hydra"}  # fmt: skip
    for logger in trainer.loggers:
        logger.log_hyperparams(container)


def _summary(metrics: dict[str, float], run_dir: Path) -> str:
    """The last validation's headline metrics, so a run's console ends with its result.

    Per-value accuracies (``val/acc/gender=female``) are left to the logs: the worst-group
    and gap columns already summarise them.
    """
    rows = {k: v for k, v in sorted(metrics.items()) if k.startswith("val/") and "=" not in k}
    if not rows:
        return f"no validation metrics (see {run_dir})"
    width = max(map(len, rows))
    lines = [f"  {k:<{width}}  {v:.4f}" for k, v in rows.items()]
    return "\n".join([f"final validation metrics (all steps: {run_dir}/csv, wandb):", *lines])


def _check_resume_point(ckpt_path: str | None, trainer: L.Trainer) -> None:
    """Refuse a resume point that is not there (Lightning would warn and start from scratch,
    e.g. after a typo in ``hydra.run.dir``), and a fresh run in a run dir that holds one
    (it would restart metrics.csv and mix two runs' checkpoints)."""
    dirs = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if cb.dirpath]
    last = [p for d in dirs for p in d.glob("last*.ckpt") if p.is_file()]
    if ckpt_path is None:
        if last:
            raise FileExistsError(
                f"hydra.run.dir={trainer.default_root_dir}: already holds a run ({last[0]}). "
                "Resume it with ckpt_path=last, or choose a new hydra.run.dir."
            )
    elif ckpt_path == "last":
        if not last:
            raise FileNotFoundError(
                f"ckpt_path=last: no last.ckpt in {[str(d) for d in dirs]}. Point "
                "hydra.run.dir at the run to resume, or drop ckpt_path to start a new run."
            )
    elif ckpt_path not in ("best", "hpc", "registry") and "://" not in ckpt_path:
        # (remote fsspec paths are left to Lightning)
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: checkpoint file not found")
        # torch.save writes a zip archive; checking its directory reads a few bytes, where
        # torch.load of a truncated or foreign file fails with a zip error naming no key
        if not zipfile.is_zipfile(ckpt_path):
            raise ValueError(
                f"ckpt_path={ckpt_path!r}: not a readable checkpoint (expected the zip archive "
                "torch.save writes; the file is truncated or of another format)"
            )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (optionally resuming), export the weights, and return the final metrics."""
    rewrite_argv_for_ddp_children()
    isolate_rank_logs()
    module, datamodule, trainer = build(cfg)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None and SLURMEnvironment.detect():
        # a requeued job: same job id, same run dir, resume where the last attempt stopped
        ckpt_path = resume_checkpoint(trainer)
    _check_resume_point(None if ckpt_path is None else str(ckpt_path), trainer)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
        continue_csv_logs(trainer)  # before any logger starts its writer
    _log_config(trainer, cfg)
    if cfg.get("validate_before_training"):
        trainer.validate(module, datamodule=datamodule)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except BaseException:
        _stop_ddp_children(trainer)
        raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        log.info(_summary(metrics, Path(cfg.paths.output_dir)))
    if cfg.get("export") and trainer.is_global_zero:
        out = export_open_clip(
            module.model, module.model_name, Path(cfg.paths.output_dir) / "export"
        )
        log.info("exported open_clip weights to %s (load with 'local-dir:%s')", out, out)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
            if trainer.is_global_zero and OmegaConf.select(cfg, "logger.wandb.offline"):
                log.info("upload: wandb sync %s/wandb/offline-run-*", logger.save_dir)
    return metrics
