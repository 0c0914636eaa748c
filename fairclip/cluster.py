"""Cluster robustness: atomic checkpoints, Slurm requeue on USR1/TERM, resume after requeue.

Why not Lightning's own Slurm requeue: it saves the checkpoint inside the signal handler,
which can hang DDP (Lightning issue #21406), and its checkpoint write is a copy from /tmp, not
an atomic rename, when /tmp is another filesystem. Here the handler only sets a flag; all
ranks agree at the next step, save atomically, and rank 0 requeues the job.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import signal
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, TorchCheckpointIO
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from fairclip.files import atomic_path

# Slurm sends it before the time limit (slurm/train.sbatch, conf/hydra/launcher/slurm.yaml:
# --signal=USR1@90); Lightning's default too. submitit's default USR2 is overridden there.
REQUEUE_SIGNAL = signal.SIGUSR1
PARTIAL_PREFIX = ".partial-"  # checkpoints being written (see AtomicCheckpointIO)

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint to a hidden file beside its target, fsync, then rename it over.

    Lightning stages a checkpoint in the system temp dir and moves it into place: across file
    systems (node-local /tmp, shared run dir) that move is a copy, which the SIGKILL ending a
    Slurm job can leave truncated. A rename within one directory is atomic, so every ``.ckpt``
    is complete; an interrupted save leaves a ``.partial-*`` file, removed on resume.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):  # remote: Lightning's way
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path, prefix=PARTIAL_PREFIX) as tmp, tmp.open("wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())


def next_hpc_checkpoint(run_dir: str | Path) -> Path:
    """``hpc_ckpt_<n+1>.ckpt``: Lightning's naming, so ``ckpt_path=hpc`` finds it too."""
    versions = [
        int(m.group(1))
        for p in Path(run_dir).glob("hpc_ckpt_*.ckpt")
        if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))
    ]
    return Path(run_dir) / f"hpc_ckpt_{max(versions, default=0) + 1}.ckpt"


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this job (array task); False, logged, if Slurm refuses."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else os.environ["SLURM_JOB_ID"]
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except OSError as err:
        log.error("cannot requeue Slurm job %s: %s", job, err)
        return False
    if proc.returncode:
        log.error("scontrol requeue %s failed: %s (submit with --requeue)", job, proc.stderr)
        return False
    log.info("requeued Slurm job %s", job)
    return True


class SlurmRequeue(L.Callback):
    """On Slurm's warning signal: checkpoint at a step boundary, requeue the job, exit.

    Slurm sends ``REQUEUE_SIGNAL`` to every task (and its DataLoader workers) before the time
    limit, and SIGTERM on preemption or scancel. Lightning's own requeue saves the checkpoint
    inside the signal handler, where it can interleave with a DDP collective and hang
    (Lightning-AI/pytorch-lightning#21406); here the handler only sets a flag. After each
    training batch the ranks sum their flags, then all save ``hpc_ckpt_<n>.ckpt`` in the run
    dir. On the requeue signal rank 0 closes the loggers and runs ``scontrol requeue``, and every
    rank exits; on SIGTERM it only saves (Slurm requeues preempted jobs itself, Lightning stops).
    It must come after the callbacks whose state the checkpoint holds (``cluster_plugins``
    appends it), so their hooks for the step have run when it saves.
    """

    def __init__(self, signum: int = REQUEUE_SIGNAL) -> None:
        self.signum = signal.Signals(signum)
        self._signaled = False
        self._saved_on_sigterm = False
        self._previous: Any = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signaled = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # before DataLoader workers fork: they inherit this handler instead of dying of USR1
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._on_signal)
            log.info("on %s: checkpoint at the next step, then requeue", self.signum.name)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        sigterm = trainer.received_sigterm and not self._saved_on_sigterm
        flags = torch.tensor(
            [self._signaled, sigterm], dtype=torch.int32, device=trainer.strategy.root_device
        )
        requeue, terminate = (
            v > 0 for v in trainer.strategy.reduce(flags, reduce_op="sum").tolist()
        )
        if not (requeue or terminate):
            return
        path = trainer.strategy.broadcast(str(next_hpc_checkpoint(trainer.default_root_dir)))
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            log.info("saved %s at step %d", path, trainer.global_step)
        if not requeue:
            self._saved_on_sigterm = True
            return
        if trainer.is_global_zero:  # flush now: the requeue SIGTERMs every process of the job
            for logger in trainer.loggers:
                logger.finalize("requeued")
                if isinstance(logger, WandbLogger):
                    logger.experiment.finish()
        requeued = trainer.strategy.broadcast(trainer.is_global_zero and requeue_slurm_job())
        if not requeued:
            log.error("not requeued: resubmit with ckpt_path=%s to continue", path)
        raise SystemExit(0 if requeued else 1)  # every rank, here; the new attempt resumes


def cluster_plugins(plugins: list[Any], callbacks: list[Any]) -> tuple[list[Any], list[Any]]:
    """Add atomic checkpoint files and, in a Slurm job, requeue handling (see SlurmRequeue)."""
    plugins = list(plugins)
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
        plugins.append(SLURMEnvironment(auto_requeue=False))
        callbacks = [*callbacks, SlurmRequeue()]
    return plugins, callbacks


def resume_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest checkpoint an earlier attempt of this run left in its run dir, if any.

    Under Slurm run dirs are keyed by the job id, so such a checkpoint comes from this job
    before a requeue: an ``hpc_ckpt_*`` (requeue signal, SIGTERM) or a ModelCheckpoint's
    ``last*.ckpt`` (crash, node failure). Leftovers of interrupted saves are removed first.
    """
    dirs = {Path(trainer.default_root_dir)}
    dirs |= {
        Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)
    }
    if rank_zero_only.rank == 0:
        for partial in (p for d in dirs for p in d.glob(f"{PARTIAL_PREFIX}*")):
            partial.unlink(missing_ok=True)
    found = [*Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")]
    found += [p for d in dirs for p in d.glob("last*.ckpt")]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def continue_csv_logs(trainer: L.Trainer) -> None:
    """Make CSVLogger append to an earlier attempt's metrics.csv instead of deleting it.

    Lightning's CSV writer deletes an existing metrics.csv when it starts; after a requeue that
    file is the run's history. Hide it while the writer starts, then hand it back with its
    header, so new rows are appended (a new metric rewrites the header and keeps the rows).
    """
    if rank_zero_only.rank != 0:
        return
    for logger in trainer.loggers:
        path = Path(logger.log_dir or "") / "metrics.csv" if isinstance(logger, CSVLogger) else None
        if path is None or not path.is_file():
            continue
        hidden = path.with_name(".metrics.csv.resume")
        path.replace(hidden)
        with warnings.catch_warnings():  # "... will be deleted": not any more
            warnings.filterwarnings("ignore", "Experiment logs directory")
            writer = logger.experiment
        hidden.replace(path)
        with open(path, newline="") as f:
            writer.metrics_keys = next(csv.reader(f), [])
