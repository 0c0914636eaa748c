"""Hydra plumbing shared by the entry points: resolvers, instantiation with clear errors,
run ids that stay stable across DDP processes, Slurm requeues and sweeps."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import netrc
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, read_write


def _conf_dir() -> str:
    """The installed ``fairclip.conf`` package (a wheel or an editable install); in a source
    tree that is on ``sys.path`` but not installed, the repository's ``conf/``."""
    spec = importlib.util.find_spec("fairclip.conf")
    if spec is not None and spec.submodule_search_locations:
        return str(Path(next(iter(spec.submodule_search_locations))).resolve())
    return str(Path(__file__).resolve().parent.parent / "conf")


CONF_DIR = _conf_dir()
RUN_ID_ENV = "FAIRCLIP_RUN_ID"

log = logging.getLogger(__name__)


def run_id() -> str:
    """Slurm job id (shared by all tasks and requeues of a job), else one timestamp per launch.

    The timestamp is stored in the environment, so processes that Lightning starts for DDP
    (they inherit it) land in the same run dir instead of a second one a second later.
    """
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}" + (f"_{task}" if task else "")
    if RUN_ID_ENV not in os.environ:
        os.environ[RUN_ID_ENV] = time.strftime("%Y-%m-%d_%H-%M-%S")
    return os.environ[RUN_ID_ENV]


def wandb_offline() -> bool:
    """Offline unless the user is logged in (env key, netrc entry) or forces WANDB_MODE=online."""
    if os.environ.get("WANDB_MODE") == "online" or os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


def gpus_per_node(accelerator: str, devices: Any) -> Any:
    """GPUs to request from Slurm for a trainer config: its device count on GPU, else none."""
    return devices if str(accelerator) in ("gpu", "cuda") else None


def register_resolvers() -> None:
    # fairclip_run_id is cached: a submitit sweep pickles the launcher's config (and its
    # resolver cache) and Hydra copies that cache into every job's config, so jobs resolve
    # hydra.sweep.dir to the launcher's sweep dir, not to a dir named after their own job id.
    resolvers = (
        ("fairclip_run_id", run_id, True),
        ("fairclip_wandb_offline", wandb_offline, False),
        ("fairclip_gpus_per_node", gpus_per_node, False),
    )
    for name, fn, cache in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=cache)


register_resolvers()


def instantiate(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(cfg[key])`` whose errors name the config key."""
    node = OmegaConf.select(cfg, key)
    if node is None:
        raise ValueError(f"config key '{key}' is missing")
    try:
        return hydra.utils.instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ValueError(f"config key '{key}' ({node.get('_target_', '?')}): {cause}") from err


def instantiate_dict(cfg: DictConfig, key: str) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (callbacks, loggers)."""
    node = OmegaConf.select(cfg, key) or {}
    return [
        instantiate(cfg, f"{key}.{name}") for name, sub in node.items() if sub and "_target_" in sub
    ]


def stable_id(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def hydra_mode() -> RunMode | None:
    return HydraConfig.get().mode if HydraConfig.initialized() else None


def rewrite_argv_for_ddp_children() -> None:
    """In a multirun job, make Lightning's DDP children re-run *this job*, not the sweep.

    Lightning re-executes ``sys.argv`` for local DDP ranks; in a sweep that still holds ``-m``
    and the sweep's comma lists, so each child would start a whole new sweep. Replace it with
    this job's own overrides, and point ``hydra.run.dir`` (which Lightning passes on) at the
    job's output dir.
    """
    if hydra_mode() != RunMode.MULTIRUN:
        return
    hc = HydraConfig.get()
    sys.argv = [sys.argv[0], *hc.overrides.task]
    with read_write(hc):
        hc.run.dir = hc.runtime.output_dir


# what Lightning's local DDP launcher leaves in os.environ of the launching process
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def sweep_job_scope() -> Iterator[None]:
    """Undo a job's DDP state in the launching process, so the next sweep job starts afresh.

    Lightning leaves the process group up and ``LOCAL_RANK``, ``MASTER_PORT``, ... in the
    environment of the process that spawned the DDP children; the next job of an in-process
    (basic launcher) sweep would take itself for an externally launched rank and wait on the
    dead group of the previous job.
    """
    if hydra_mode() != RunMode.MULTIRUN:
        yield
        return
    saved = {k: os.environ.get(k) for k in _DDP_ENV}
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def isolate_rank_logs() -> None:
    """Send a non-zero DDP rank's file log to ``<name>.rank<r>.log`` instead of rank 0's file.

    Every DDP process (Slurm tasks, Lightning's local children) runs Hydra on the same run dir,
    so without this they would all append to one ``train.log``.
    """
    rank = rank_zero_only.rank
    if not rank:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            path = Path(handler.baseFilename)
            moved = logging.FileHandler(path.with_name(f"{path.stem}.rank{rank}{path.suffix}"))
            moved.setLevel(handler.level)
            moved.setFormatter(handler.formatter)
            root.removeHandler(handler)
            handler.close()
            root.addHandler(moved)


# -- Slurm: atomic checkpoints, requeue at a step boundary, automatic resume --------------
