"""Shared fixtures: a small synthetic dataset on disk and composed Hydra configs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from fairclip.cli.data import main as data_main
from fairclip.runtime import CONF_DIR

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")


def run_app(main: Callable[[], Any], args: Sequence[str]) -> Any:
    """Run a fairclip Hydra app (``fairclip.cli.*.main``) in this process, as its console
    script would with ``args``; an error propagates as the original exception."""
    GlobalHydra.instance().clear()
    argv, full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv, os.environ["HYDRA_FULL_ERROR"] = ["fairclip-app", *args], "1"
    try:
        return main()
    finally:
        sys.argv = argv
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
        GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4k biased train samples in 16 shards, balanced eval and val splits, a neutral split."""
    out = tmp_path_factory.mktemp("synthetic")
    run_app(
        data_main,
        [
            "source=synthetic",
            f"out={out}",
            "train_size=4000",
            "shard_size=250",
            "eval_size=480",
            "eval_shard_size=60",
            "neutral_size=120",
            "val_size=240",
            "synthetic.association=0.9",
        ],
    )
    return out


def compose_entry(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose conf/<config_name>.yaml as its entry point would, with output under ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
    return cfg


def compose_train(overrides: list[str], output_dir: Path) -> DictConfig:
    """`fairclip-train`'s composed config."""
    return compose_entry("train", overrides, output_dir)


def small_run_overrides(data: Path, *extra: str) -> list[str]:
    """A fast CPU run on the fixture data (no progress bar, CSV logger only)."""
    return [
        "experiment=demo",
        f"data.train_shards={data}/train",
        f"data.val_shards={data}/eval",
        "data.num_workers=1",
        "data.batch_size=64",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        *extra,
    ]


def run_train_process(
    data: Path, out: Path, log_dir: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """`fairclip-train` as its own process (DDP on CPU spawns ranks), run dir ``out``; fails
    the test with the output tail unless it exits 0."""
    cmd = [
        str(Path(sys.executable).parent / "fairclip-train"),
        *small_run_overrides(data, *extra),
        f"hydra.run.dir={out}",
        f"paths.log_dir={log_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# -- bias evaluation (tests/test_evaluate.py, tests/test_report.py) ----------------------------
def compose_eval(overrides: list[str], output_dir: Path) -> DictConfig:
    """`fairclip-eval`'s composed config."""
    return compose_entry("eval", overrides, output_dir)


@pytest.fixture(scope="session")
def trained_run(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One demo run shared by the evaluation tests, on the biased fixture data (association
    0.9), with the bias-eval callback and the offline wandb logger. Its run dir holds
    checkpoints/last.ckpt, export/, bias_eval/report.* and wandb/offline-run-*."""
    from fairclip.training import train

    out = tmp_path_factory.mktemp("trained_run")
    overrides = [
        o
        for o in small_run_overrides(
            synthetic_dir,
            "trainer.max_epochs=3",  # the fewest epochs where the planted bias is clear
            "trainer.limit_val_batches=0",
            "callbacks=bias_eval",
        )
        if o != "logger=csv"
    ]
    # an explicit wandb id: the default one derives from hydra.runtime.output_dir, which a
    # composed (not launched) config does not have
    train(compose_train([*overrides, "logger=default", "logger.wandb.id=trained-run"], out))
    return out
