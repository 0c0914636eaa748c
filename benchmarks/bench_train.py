"""Training throughput: `fairclip-train` vs open_clip's own trainer on the same shards and model.

Both run one epoch of the tiny CLIP (``fairclip-tiny``) on the same synthetic WebDataset
shards, with the same batch size, loader workers, precision and optimizer settings, and
report steady-state samples/s measured the same way (batch-start to batch-start wall time,
first interval dropped as warm-up). Target: fairclip >= 0.9x open_clip.

``--with-sae`` also runs fairclip-train with ``callbacks=sae`` (SAE updates every 20 steps on
the buffered embeddings, plus the final SAEs after the epoch, which the rate does not include)
and prints its cost relative to the plain run.

    python benchmarks/bench_train.py [--samples 8000] [--batch-size 128] [--workers 1] [--with-sae]
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent
# open_clip_train's WebDataset code needs webdataset<=0.2.86 (open_clip_torch[training] pins it);
# fairclip uses 1.0.x. The open_clip run gets the old version from a shadowing directory.
OLD_WDS = Path(__file__).parent / ".cache" / "webdataset-0.2.86"


def old_webdataset() -> Path:
    if not (OLD_WDS / "webdataset").is_dir():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(OLD_WDS),
             "webdataset==0.2.86"],
            check=True,
        )  # fmt: skip
    return OLD_WDS


def make_shards(out: Path, samples: int, shard_size: int) -> Path:
    subprocess.run(
        [str(BIN / "fairclip-data"), "source=synthetic", f"out={out}", f"train_size={samples}",
         f"shard_size={shard_size}", "eval_size=48", "eval_shard_size=48", "splits=[train,eval]"],
        check=True, capture_output=True,
    )  # fmt: skip
    return out


def run_fairclip(data: Path, out: Path, args: argparse.Namespace, *extra: str) -> float:
    cmd = [
        str(BIN / "fairclip-train"),
        "experiment=demo",
        f"data.train_shards={data}/train",
        f"data.val_shards={data}/eval",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=10",
        "logger=csv",
        "export=false",
        "module.warmup_steps=50",
        f"hydra.run.dir={out}",
        *extra,
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    with open(out / "csv" / "metrics.csv") as f:
        # Lightning's ThroughputMonitor: all ranks' rate on >1 device, else the device's
        key = "train/device/samples_per_sec"
        rates = [
            float(r.get("train/samples_per_sec") or r[key]) for r in csv.DictReader(f) if r.get(key)
        ]
    return statistics.mean(rates[1:]) if len(rates) > 1 else rates[0]


def run_open_clip(data: Path, out: Path, samples: int, args: argparse.Namespace) -> float:
    shards = sorted((data / "train").glob("*.tar"))
    first, last = shards[0].stem.split("-")[1], shards[-1].stem.split("-")[1]
    # Import fairclip's model configs into open_clip's registry, then run open_clip's own main.
    runner = "import sys, fairclip.model.factory; from open_clip_train.main import main; main(sys.argv[1:])"
    cmd = [
        sys.executable, "-c", runner,
        "--train-data", f"{data}/train/train-{{{first}..{last}}}.tar",
        "--train-num-samples", str(samples), "--dataset-type", "webdataset",
        "--model", "fairclip-tiny", "--batch-size", str(args.batch_size), "--epochs", "1",
        "--workers", str(args.workers), "--lr", "1e-3", "--wd", "0.1", "--warmup", "50",
        "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--precision", "fp32",
        "--log-every-n-steps", "10", "--save-frequency", "0", "--report-to", "",
        "--logs", str(out), "--name", "bench", "--seed", "0",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(old_webdataset())}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    log = (out / "bench" / "out.log").read_text()
    batch_times = [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", log)]
    rates = [args.batch_size / t for t in batch_times]
    return statistics.mean(rates[1:]) if len(rates) > 1 else rates[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--with-sae", action="store_true", help="also time callbacks=sae")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_shards(tmp / "data", args.samples, args.shard_size)
        ours = run_fairclip(data, tmp / "fairclip", args)
        theirs = run_open_clip(data, tmp / "open_clip", args.samples, args)
        with_sae = run_fairclip(data, tmp / "sae", args, "callbacks=sae") if args.with_sae else 0
    print(
        f"samples={args.samples} batch={args.batch_size} workers={args.workers} model=fairclip-tiny fp32"
    )
    print(f"fairclip-train        : {ours:8.1f} samples/s")
    print(f"open_clip_train.main  : {theirs:8.1f} samples/s")
    print(f"ratio fairclip/open_clip: {ours / theirs:.2f}x (target >= 0.90x)")
    if args.with_sae:
        print(f"fairclip-train callbacks=sae: {with_sae:8.1f} samples/s ({with_sae / ours:.2f}x)")


if __name__ == "__main__":
    main()
