"""The wheel carries the configs: a plain (non-editable) install runs from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import tomllib
from setuptools import find_packages

REPO = Path(__file__).resolve().parent.parent


def test_package_list_names_every_package_folder() -> None:
    """pyproject.toml lists the packages explicitly (a package-dir mapping for fairclip.conf
    cannot be combined with packages.find): the list must hold every folder of fairclip/."""
    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = find_packages(str(REPO), include=["fairclip", "fairclip.*"])
    assert sorted(listed["packages"]) == sorted([*found, "fairclip.conf"])
    assert listed["package-dir"] == {"fairclip.conf": "conf"}


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_wheel_installs_and_trains_from_an_empty_directory(tmp_path: Path) -> None:
    """Build the wheel, install it (no deps) into a fresh venv that reuses this venv's
    site-packages for the dependencies, and from an empty directory write data, show
    ``--help`` and train a few steps: Hydra finds the configs inside the installed package."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("PYTHONPATH", None)
    pip = [sys.executable, "-m", "pip"]
    # build from a copy: setuptools builds in place and would leave build/ in the repository
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("fairclip", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    _run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(src)], src, env)  # fmt: skip
    wheel = next(tmp_path.glob("fairclip-*.whl"))

    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    python = fresh / "bin" / "python"
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            tmp_path,
            env,
        ).strip()  # fmt: skip
    )
    # a plain path line: the dependencies, without this venv's editable fairclip finder
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([*pip, "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)], REPO, env)  # fmt: skip

    work = tmp_path / "empty"
    work.mkdir()
    where = _run(
        [str(python), "-c", "import fairclip.runtime as r; print(r.__file__); print(r.CONF_DIR)"],
        work,
        env,
    ).split()
    assert all(str(REPO) not in p and p.startswith(str(site)) for p in where), where
    assert (
        Path(where[1], "train.yaml").is_file()
        and Path(where[1], "model", "tiny_clip.yaml").is_file()
    )

    bin_dir = fresh / "bin"
    help_text = _run([str(bin_dir / "fairclip-train"), "--help"], work, env)
    assert "== Configuration groups ==" in help_text and "model: " in help_text
    assert "tiny_clip" in help_text and "experiment: " in help_text
    _run(
        [str(bin_dir / "fairclip-data"), "source=synthetic", "out=data", "train_size=256",
         "shard_size=128", "eval_size=64", "eval_shard_size=64", "neutral_size=32",
         "val_size=64"],
        work, env,
    )  # fmt: skip
    _run(
        [str(bin_dir / "fairclip-train"), "experiment=demo", "data.train_shards=data/train",
         "data.val_shards=data/val", "data.num_workers=0", "data.batch_size=32",
         "trainer.max_steps=3", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
         "logger=csv", "callbacks=none", "hydra.run.dir=run"],
        work, env,
    )  # fmt: skip
    assert (work / "run" / ".hydra" / "config.yaml").is_file()
    assert list((work / "run").rglob("metrics.csv")), sorted(
        p.name for p in (work / "run").rglob("*")
    )
