"""Cluster runs: sbatch DDP jobs, requeue + resume, submitit and local sweeps.

The tests marked ``slurm`` run against a real single-node Slurm (slurm/cluster.sh installs and
starts one as root) when ``FAIRCLIP_TEST_SLURM=1`` or ``CI=true``; elsewhere they skip. The
others check the same plumbing without Slurm: launcher configs, the sbatch script's argument
handling, the sweep-dir cache, atomic checkpoints and the requeue callback.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from fairclip.cluster import AtomicCheckpointIO, SlurmRequeue, continue_csv_logs, resume_checkpoint
from fairclip.runtime import RUN_ID_ENV, stable_id
from fairclip.training import build
from tests.conftest import compose_train, small_run_overrides

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "slurm" / "cluster.sh"
TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"
BIN = Path(sys.executable).parent
# 4 epochs x 3 steps on 2 ranks: long enough to signal mid-run, short enough for 2 loaded cores
EPOCHS, STEPS = 4, 3
DEAD_WANDB_SERVICE = "3-1-tcp-localhost-9"  # wandb's token format; nothing listens on port 9
FINAL_STEP = EPOCHS * STEPS


def tiny_job(data: Path, log_dir: Path, *extra: str) -> list[str]:
    """Overrides for a tiny CPU DDP run (devices / num_nodes come from the allocation)."""
    base = [o for o in small_run_overrides(data) if o != "logger=csv"]  # wandb files are checked
    return [
        *base,
        "trainer.accelerator=cpu",
        "trainer.strategy=ddp",
        f"trainer.max_epochs={EPOCHS}",
        f"trainer.limit_train_batches={STEPS}",
        "trainer.limit_val_batches=1",
        "export=false",
        f"paths.log_dir={log_dir}",
        *extra,
    ]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without Slurm job variables or a run id, with the venv on PATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(("SLURM_", "SRUN_", "SBATCH_")) or k in (RUN_ID_ENV, "WANDB_SERVICE"))
    }
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        OMP_NUM_THREADS="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
        HYDRA_FULL_ERROR="1",
    )
    env.update(extra)
    return env


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


# the jobs record each rank's sample keys and train a small SAE (every 2 steps, and at the end)
AUDIT_AND_SAE = (
    "callbacks=[audit,sae]", "callbacks.sae.every_n_steps=2", "callbacks.sae.n_latents=64",
    "callbacks.sae.final_samples=256", "callbacks.sae.final_epochs=5",
)  # fmt: skip


def sae_update_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("sae/text/buffer_rows")]


def csv_epochs(run_dir: Path) -> set[int]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(row["epoch"]) for row in csv.DictReader(f) if row.get("val/acc")}


def wandb_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def in_wandb_group(run: Path, group: str) -> bool:
    """Whether an offline run's ``.wandb`` file holds a RunRecord with this group."""
    from wandb.proto import wandb_internal_pb2 as pb

    record = pb.RunRecord(run_group=group).SerializeToString()
    return record in next(run.glob("run-*.wandb")).read_bytes()


# -- without Slurm --------------------------------------------------------------------


def test_launcher_and_trainer_configs_compose(tmp_path: Path) -> None:
    cfg = compose_train(["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2"], tmp_path)
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.additional_parameters.signal == "USR1@90"  # fairclip's requeue signal
    assert launcher.additional_parameters.requeue is True
    assert launcher.max_num_timeout == 0  # submitit must not requeue on its own
    assert not launcher.name.startswith(("bash", "interactive"))
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("gpu", "bf16-mixed")
    cfg = compose_train(["hydra/launcher=slurm", "trainer=gpu"], tmp_path)
    assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.trainer.precision == "bf16-mixed"
    cfg = compose_train(["hydra/launcher=slurm", "trainer=ddp_cpu"], tmp_path)
    assert (cfg.hydra.launcher.tasks_per_node, cfg.hydra.launcher.gpus_per_node) == (2, None)
    cfg = compose_train(["hydra/launcher=local", "trainer=ddp", "trainer.precision=16-mixed"], tmp_path)  # fmt: skip
    assert cfg.hydra.launcher._target_.endswith("BasicLauncher")


def test_ddp_config_builds_a_mixed_precision_ddp_trainer_without_a_gpu(
    synthetic_dir: Path, tmp_path: Path
) -> None:
    """trainer=ddp as on a GPU node, but on CPU: strategy, world size and precision resolve."""
    overrides = small_run_overrides(synthetic_dir, "trainer=ddp", "trainer.accelerator=cpu")
    _, _, trainer = build(compose_train(overrides, tmp_path))
    assert type(trainer.strategy).__name__ == "DDPStrategy" and trainer.world_size == 4
    assert trainer.precision == "bf16-mixed"
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_sweep_jobs_resolve_the_launchers_sweep_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What hydra-submitit-launcher does: resolve the sweep dir where the sweep is launched,
    pickle the config, rebuild it in each Slurm job and copy the resolver cache over."""
    for var in (RUN_ID_ENV, "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.setenv(var, "")  # so that monkeypatch restores what run_id() sets
        monkeypatch.delenv(var)
    launcher = compose_train([], tmp_path)
    sweep_dir = str(launcher.hydra.sweep.dir)
    shipped = pickle.loads(pickle.dumps(launcher))

    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    job = compose_train([], tmp_path)
    OmegaConf.copy_cache(from_config=shipped, to_config=job)
    assert str(job.hydra.sweep.dir) == sweep_dir
    assert str(compose_train([], tmp_path).hydra.run.dir).endswith("slurm-4242_1")


def run_train_sbatch(tmp_path: Path, *args: str, **env: str) -> tuple[int, str, list[str]]:
    """Run slurm/train.sbatch as the batch step would, with a fake srun that records its args."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (fake / "srun").chmod(0o755)
    record = tmp_path / "srun-args"
    record.unlink(missing_ok=True)
    job = {
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NAME": "fairclip-train",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SRUN_ARGS": str(record),
        **env,
    }
    env_all = clean_env(**job)
    env_all["PATH"] = f"{fake}{os.pathsep}{env_all['PATH']}"
    proc = subprocess.run(
        ["bash", str(TRAIN_SBATCH), *args], env=env_all, capture_output=True, text=True
    )
    srun = record.read_text().split("\n")[:-1] if record.exists() else []
    return proc.returncode, proc.stderr, srun


def test_train_sbatch_ties_ddp_layout_to_the_allocation(tmp_path: Path) -> None:
    rc, err, srun = run_train_sbatch(tmp_path, "trainer=ddp", "seed=1")
    assert rc == 0, err
    assert srun[:2] == ["--kill-on-bad-exit=1", "fairclip-train"]
    assert sorted(srun[2:4]) == ["trainer.devices=4", "trainer.num_nodes=2"]
    assert srun[4:] == ["trainer=ddp", "seed=1"]
    rc, err, srun = run_train_sbatch(tmp_path, "trainer.devices=4")  # consistent: kept once
    assert rc == 0 and srun.count("trainer.devices=4") == 1, (err, srun)

    rc, err, srun = run_train_sbatch(tmp_path, "trainer.devices=2")
    assert rc == 2 and "trainer.devices=2 but the allocation has 4" in err and not srun
    rc, err, srun = run_train_sbatch(tmp_path, SLURM_JOB_NAME="interactive")
    assert rc == 2 and "disables Lightning's Slurm support" in err and not srun
    rc, err, srun = run_train_sbatch(tmp_path, SLURM_NTASKS_PER_NODE="")
    assert rc == 2 and "--ntasks-per-node" in err and not srun


def test_checkpoint_write_killed_midway_leaves_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, target)
    killed_mid_write = f"""
import os, signal, torch
from fairclip.cluster import AtomicCheckpointIO
def write_half_and_die(obj, f, *args, **kwargs):
    f.write(b"x" * 4096); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
torch.save = write_half_and_die
AtomicCheckpointIO().save_checkpoint({{"global_step": 2}}, {str(target)!r})
"""
    proc = subprocess.run([sys.executable, "-c", killed_mid_write], env=clean_env())
    assert proc.returncode == -signal.SIGKILL
    assert ckpt_step(target) == 1  # the old checkpoint, complete
    assert len(list(tmp_path.glob(".partial-*"))) == 1
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), checkpoint_callbacks=[])
    assert resume_checkpoint(trainer) == str(target)  # type: ignore[arg-type]
    assert not list(tmp_path.glob(".partial-*"))  # cleaned up before resuming


def test_resumed_run_appends_to_the_earlier_metrics_csv(tmp_path: Path) -> None:
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run keeps it."""
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("epoch,step,val/acc\n0,2,0.5\n")
    logger = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    continue_csv_logs(SimpleNamespace(loggers=[logger]))  # type: ignore[arg-type]
    logger.log_metrics({"val/acc": 0.7, "train/loss": 1.0}, step=5)
    logger.save()
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["val/acc"], r["train/loss"]) for r in rows] == [
        ("2", "0.5", ""),
        ("5", "0.7", "1.0"),
    ]


class RecordKeys(L.Callback):
    """The sample keys of every trained batch, in order: (epoch, keys) per batch."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, list[str]]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, idx) -> None:
        self.batches.append((trainer.current_epoch, list(batch["key"])))


def test_requeue_signal_checkpoints_at_a_step_boundary_and_resumes(
    synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """USR1 mid-epoch: checkpoint at the step boundary, requeue, and the new attempt continues
    the epoch with the next batch (two loader workers): the two attempts together train on
    exactly the batches of an uninterrupted run, none replayed or left out. The cut is in the
    second epoch, whose shard plan differs from the first's."""
    requeued: list[bool] = []
    monkeypatch.setattr("fairclip.cluster.requeue_slurm_job", lambda: requeued.append(True) or True)
    common = ["trainer.max_epochs=2", "trainer.limit_train_batches=5", "trainer.limit_val_batches=1",
              "export=false", "data.num_workers=2"]  # fmt: skip

    reference = RecordKeys()
    module, dm, trainer = build(
        compose_train(small_run_overrides(synthetic_dir, *common), tmp_path / "ref")
    )
    trainer.callbacks.insert(0, reference)
    trainer.fit(module, datamodule=dm)
    assert len(reference.batches) == 10

    class SignalAtStep7(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            if trainer.global_step == 7:
                os.kill(os.getpid(), signal.SIGUSR1)  # as Slurm's --signal=USR1@90 would

    first, second = RecordKeys(), RecordKeys()
    cfg = compose_train(small_run_overrides(synthetic_dir, *common), tmp_path)
    module, dm, trainer = build(cfg)
    trainer.callbacks[:0] = [first, SignalAtStep7(), SlurmRequeue()]
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        with pytest.raises(SystemExit) as exit_info:
            trainer.fit(module, datamodule=dm)
    finally:
        signal.signal(signal.SIGUSR1, previous)  # Lightning re-installs ours on errors
    assert exit_info.value.code == 0 and requeued == [True]
    assert ckpt_step(tmp_path / "hpc_ckpt_1.ckpt") == 7

    # the requeued attempt: same run dir, resumes from the newest checkpoint
    module, dm, trainer = build(
        compose_train(small_run_overrides(synthetic_dir, *common), tmp_path)
    )
    assert resume_checkpoint(trainer) == str(tmp_path / "hpc_ckpt_1.ckpt")
    trainer.callbacks.insert(0, second)
    trainer.fit(module, datamodule=dm, ckpt_path=str(tmp_path / "hpc_ckpt_1.ckpt"))
    assert trainer.global_step == 10
    assert len(first.batches) == 7 and second.batches[0][0] == 1  # cut mid-epoch 1
    assert first.batches + second.batches == reference.batches


@pytest.mark.slow
def test_local_multirun_with_ddp_gives_each_job_its_own_dir(
    synthetic_dir: Path, tmp_path: Path
) -> None:
    cmd = [str(BIN / "fairclip-train"), "-m", "hydra/launcher=local", "seed=0,1",
           *tiny_job(synthetic_dir, tmp_path, "trainer.devices=2", "trainer.max_epochs=1")]  # fmt: skip
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep,) = (tmp_path / "demo" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        run = sweep / job
        assert ckpt_step(run / "checkpoints" / "last.ckpt") == STEPS
        (wandb_run,) = wandb_runs(run)
        assert in_wandb_group(wandb_run, sweep.name)
        # the DDP child logs to its own file, not into rank 0's
        assert (run / "demo.log").read_text().count("Parsing model identifier") == 1
        assert (run / "demo.rank1.log").is_file()
    assert len(list(tmp_path.glob("**/.hydra/config.yaml"))) == 2


# -- against a real Slurm ---------------------------------------------------------------


def slurm_allowed() -> bool:
    flag = os.environ.get("FAIRCLIP_TEST_SLURM", "") == "1"
    return flag or os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def slurm_env() -> Iterator[dict[str, str]]:
    """A running single-node cluster (installed and started here if needed) and its env."""
    if not slurm_allowed():
        pytest.skip("real-Slurm tests: set FAIRCLIP_TEST_SLURM=1 (or CI=true); they install "
                    "slurm-wlm + munge and start a local cluster, as root")  # fmt: skip
    if os.geteuid() != 0:
        pytest.skip("installing and starting a local Slurm cluster needs root")
    state = Path(os.environ.get("FAIRCLIP_SLURM_DIR", "/tmp/fairclip-slurm"))
    pid = state / "slurmctld.pid"
    comm = Path(f"/proc/{pid.read_text().strip()}/comm") if pid.is_file() else None
    was_running = comm is not None and comm.exists() and comm.read_text().strip() == "slurmctld"
    for step, limit in (("install", 1200), ("start", 120)):
        proc = subprocess.run(
            [str(CLUSTER), step], capture_output=True, text=True, timeout=limit, env=clean_env()
        )
        if proc.returncode:
            pytest.fail(f"slurm/cluster.sh {step} failed:\n{proc.stdout}{proc.stderr}")
    # Jobs inherit the submitter's environment. A wandb service token left there by an earlier
    # in-process wandb run once made a job log into pytest's service and hang (CI, stop 9);
    # this dead one makes every job prove that fairclip-train starts its own service.
    yield clean_env(SLURM_CONF=str(state / "slurm.conf"), WANDB_SERVICE=DEAD_WANDB_SERVICE)
    if not was_running:
        subprocess.run([str(CLUSTER), "stop"], timeout=60, env=clean_env())


def job_info(env: dict[str, str], job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str | Callable[[], str],
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log and log.exists() else ""
            what = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")
        time.sleep(0.25)


def wait_for_job(env: dict[str, str], job: str, log: Path, timeout: float = 420) -> dict:
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")

    def what() -> str:  # at the timeout: a job stuck PENDING says why (e.g. Resources)
        info = job_info(env, job)
        queue = subprocess.run(["squeue"], env=env, capture_output=True, text=True).stdout
        return f"job {job} ({info['JobState']}, reason {info.get('Reason')}); queue:\n{queue}"

    wait_until(lambda: job_info(env, job)["JobState"] in done, timeout, what, log)
    info = job_info(env, job)
    assert info["JobState"] == "COMPLETED", f"job {job}: {info['JobState']}\n" + log.read_text()[-4000:]  # fmt: skip
    return info


def sbatch(env: dict[str, str], out_dir: Path, overrides: list[str]) -> tuple[str, Path]:
    cmd = ["sbatch", "--parsable", "--ntasks-per-node=2", f"--output={out_dir}/%x-%j.out",
           str(TRAIN_SBATCH), *overrides]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=out_dir, capture_output=True, text=True, check=True)
    job = proc.stdout.strip().split(";")[0]
    return job, out_dir / f"fairclip-train-{job}.out"


@pytest.fixture(scope="module")
def ddp_jobs(
    slurm_env: dict[str, str], synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[str, Path, Path]]:
    """Two identical 2-task DDP jobs, run side by side; the second is sent USR1 in epoch >= 1.

    Returns name -> (job id, Slurm output file, run dir).
    """
    jobs = {}
    for name in ("plain", "requeued"):
        out = tmp_path_factory.mktemp(name)
        job, log = sbatch(slurm_env, out, tiny_job(synthetic_dir, out / "logs", *AUDIT_AND_SAE))
        jobs[name] = (job, log, out / "logs" / "demo" / "runs" / f"slurm-{job}")

    job, log, run = jobs["requeued"]
    # all ranks armed and the first epoch checkpointed: the signal lands in a later epoch
    wait_until(lambda: (run / "checkpoints" / "last.ckpt").exists(), 300, "epoch 0", log)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm_env, check=True)
    wait_until(lambda: job_info(slurm_env, job)["Restarts"] == "1", 120, "the requeue", log)
    # a requeued job waits ~2 min (BeginTime) before it is eligible again: release it now
    wait_until(lambda: job_info(slurm_env, job)["JobState"] == "PENDING", 60, "pending", log)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=slurm_env, check=True)  # fmt: skip
    return jobs


@pytest.mark.slurm
def test_sbatch_ddp_job_writes_checkpoint_metrics_and_wandb_run(
    slurm_env: dict[str, str], ddp_jobs: dict[str, tuple[str, Path, Path]]
) -> None:
    job, log, run = ddp_jobs["plain"]
    wait_for_job(slurm_env, job, log)
    assert [p.name for p in run.parent.iterdir()] == [run.name]  # one run dir for both tasks
    assert len(list(run.glob("**/.hydra/config.yaml"))) == 1
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == FINAL_STEP
    assert csv_epochs(run) == set(range(EPOCHS))
    (wandb_run,) = wandb_runs(run)
    assert wandb_run.name.endswith(f"-{stable_id(str(run.resolve()))}")
    assert (run / "demo.log").read_text().count("Parsing model identifier") == 1
    assert (run / "demo.rank1.log").read_text().count("Parsing model identifier") == 1


@pytest.mark.slurm
def test_requeued_job_resumes_to_the_same_step_and_leaves_no_corrupt_checkpoint(
    slurm_env: dict[str, str], ddp_jobs: dict[str, tuple[str, Path, Path]]
) -> None:
    job, log, run = ddp_jobs["requeued"]
    info = wait_for_job(slurm_env, job, log)
    assert info["Restarts"] == "1"
    text = log.read_text()
    assert text.count("attempt 2") == 1 and f"resuming from {run}/hpc_ckpt_1.ckpt" in text
    interrupted_at = ckpt_step(run / "hpc_ckpt_1.ckpt")
    assert STEPS <= interrupted_at < FINAL_STEP
    plain_run = ddp_jobs["plain"][2]
    wait_for_job(slurm_env, *ddp_jobs["plain"][:2])
    final = ckpt_step(run / "checkpoints" / "last.ckpt")
    assert final == ckpt_step(plain_run / "checkpoints" / "last.ckpt") == FINAL_STEP
    # every checkpoint the killed attempt and the resumed one left is complete
    ckpts = list(run.glob("**/*.ckpt"))
    assert len(ckpts) >= 3 and all(isinstance(ckpt_step(p), int) for p in ckpts)
    assert not list(run.glob("**/.partial-*"))
    # history from before the requeue is kept; both attempts log to one wandb run
    assert csv_epochs(run) == set(range(EPOCHS))
    wandb_ids = {p.name.rsplit("-", 1)[1] for p in wandb_runs(run)}
    assert len(wandb_runs(run)) == 2 and wandb_ids == {stable_id(str(run.resolve()))}
    # the data: each rank's epochs match the uninterrupted job's; the cut epoch holds only
    # the batches after the cut (the epoch continued, not replayed)
    state = torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    # the during-training SAE went on from the checkpoint, updating at the same steps
    (sae_state,) = [v for k, v in state["callbacks"].items() if "SAECallback" in k]
    assert sae_state["batches"] == interrupted_at and set(sae_state["saes"]) == {"text", "image"}
    assert sae_update_steps(run) == sae_update_steps(plain_run) == list(range(2, FINAL_STEP + 1, 2))
    assert json.loads((run / "sae" / "metrics.json").read_text())["text"]["n"] == 256
    cut_epoch, done = (
        state["ShardDataModule"]["train_epoch"],
        state["ShardDataModule"]["train_batches"],
    )
    for rank in (0, 1):
        for epoch in range(EPOCHS):
            name = f"seen_keys/rank{rank}-epoch{epoch}.txt"
            plain_keys = (plain_run / name).read_text().split()
            keys = (run / name).read_text().split()
            if epoch == cut_epoch and 0 < done < STEPS:
                assert keys == plain_keys[done * 64 :], (rank, epoch, done)
            else:
                assert keys == plain_keys, (rank, epoch)


@pytest.mark.slurm
def test_sweep_through_submitit_launcher_runs_each_job_in_its_own_dir(
    slurm_env: dict[str, str], synthetic_dir: Path, tmp_path: Path
) -> None:
    cmd = [str(BIN / "fairclip-train"), "-m", "hydra/launcher=slurm", "seed=0,1",
           "hydra.launcher.timeout_min=15",
           *tiny_job(synthetic_dir, tmp_path, "trainer.devices=2", "trainer.max_epochs=1")]  # fmt: skip
    proc = subprocess.run(cmd, env=slurm_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # one sweep dir, named where the sweep was launched (not after each job's Slurm id)
    (sweep,) = (tmp_path / "demo" / "multiruns").iterdir()
    assert not sweep.name.startswith("slurm-")
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [".submitit", "0", "1"]
    ids = set()
    for job in ("0", "1"):
        run = sweep / job
        assert ckpt_step(run / "checkpoints" / "last.ckpt") == STEPS
        assert csv_epochs(run) == {0}
        (wandb_run,) = wandb_runs(run)
        assert in_wandb_group(wandb_run, sweep.name)
        ids.add(wandb_run.name.rsplit("-", 1)[1])
        assert (run / "demo.rank1.log").is_file()  # 2 tasks per job, one log each
    assert len(ids) == 2
    submitted = next(sweep.glob(".submitit/*/*_submission.sh")).read_text()
    assert "#SBATCH --signal=USR1@90" in submitted and "#SBATCH --ntasks-per-node=2" in submitted


def test_cluster_script_is_valid_bash() -> None:
    for script in (CLUSTER, TRAIN_SBATCH, TRAIN_SBATCH.with_name("eval.sbatch")):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
    if shutil.which("shellcheck"):
        assert subprocess.run(["shellcheck", "-S", "warning", str(CLUSTER)]).returncode == 0
