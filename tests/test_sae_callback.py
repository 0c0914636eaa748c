"""The SAE callback: SAEs trained during and after a short demo run, saved and logged."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from fairclip.callbacks.sae import SAECallback
from fairclip.loading import load_model
from fairclip.sae import load_sae, sae_metrics
from tests.conftest import compose_train, run_train_process, small_run_overrides


@pytest.fixture(scope="module")
def sae_run(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fairclip.training import train

    out = tmp_path_factory.mktemp("sae_run")
    overrides = small_run_overrides(
        synthetic_dir,
        "callbacks=sae",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=10",
        "trainer.limit_val_batches=1",
        "callbacks.sae.every_n_steps=5",
        "callbacks.sae.steps_per_update=8",
        "callbacks.sae.n_latents=128",
        "callbacks.sae.final_samples=1024",
        "callbacks.sae.final_epochs=40",
        "export=true",
    )
    train(compose_train(overrides, out))
    return out


def _logged(run_dir: Path) -> list[dict[str, str]]:
    files = list(run_dir.glob("csv/**/metrics.csv"))
    assert files, f"no metrics.csv under {run_dir}/csv"
    with files[0].open() as f:
        return list(csv.DictReader(f))


def test_sae_files_and_metrics(sae_run: Path) -> None:
    folder = sae_run / "sae"
    for mod in ("text", "image"):
        sae = load_sae(folder / f"{mod}_sae.safetensors")
        assert sae.cfg.n_latents == 128 and sae.cfg.d_in == 64
    final = json.loads((folder / "metrics.json").read_text())
    assert final["text"]["fvu"] < 0.5 and final["image"]["fvu"] < 0.5
    assert final["text"]["dead_fraction"] < 0.9

    rows = _logged(sae_run)
    during = [float(r["sae/fvu"]) for r in rows if r.get("sae/fvu")]
    assert len(during) >= 3, "sae/fvu should be logged every 5 steps during training"
    assert all(0 <= v < 1 for v in during[-2:])
    assert any(r.get("sae/text/l0") for r in rows) and any(
        r.get("sae/image/dead_fraction") for r in rows
    )
    # updates at steps 5, 10, 15, 20 on the growing FIFO of the steps' embeddings (64 per step)
    buffer_rows = [float(r["sae/text/buffer_rows"]) for r in rows if r.get("sae/text/buffer_rows")]
    assert buffer_rows == [320.0, 640.0, 960.0, 1280.0]
    finals = [float(r["sae/final_fvu"]) for r in rows if r.get("sae/final_fvu")]
    assert finals and finals[-1] < 1

    top = json.loads((folder / "top_activating.json").read_text())
    assert top, "top-activating captions per latent"
    caption, act = next(iter(top.values()))[0]
    assert isinstance(caption, str) and caption and "<" not in caption and act > 0


def test_saved_text_sae_matches_final_model(sae_run: Path) -> None:
    """The text SAE describes the exported weights: low FVU on their caption embeddings."""
    bundle = load_model(str(sae_run))
    captions = ["a photo of a doctor.", "a nurse at work.", "a young woman working as a pilot."]
    with torch.no_grad():
        emb = bundle.model.encode_text(bundle.tokenizer(captions * 4), normalize=True)
    sae = load_sae(sae_run / "sae" / "text_sae.safetensors")
    assert sae_metrics(sae, emb)["cos"] > 0.8


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="callbacks.sae.modalities"):
        SAECallback(tmp_path, modalities=["audio"])
    with pytest.raises(ValueError, match="callbacks.sae.every_n_steps"):
        SAECallback(tmp_path, every_n_steps=0)


def test_compare_uses_the_run_sae(sae_run: Path, synthetic_dir: Path, tmp_path: Path) -> None:
    """`compare` picks up <run dir>/sae/text_sae.safetensors instead of training an SAE."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fairclip.eval.method_table import compare_methods as run
    from fairclip.runtime import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="debias_compare",
            overrides=[
                f"model.name={sae_run}",
                f"data.val_shards={synthetic_dir}/eval",
                f"output_dir={tmp_path}",
                "methods=[sem_b]",
                "wandb.enabled=false",
            ],
        )
    result = run(cfg)
    assert result["sae"]["source"].endswith("sae/text_sae.safetensors")
    assert (tmp_path / "compare.md").is_file()


@pytest.mark.slow  # minutes on 2 cores: CI runs it with the slow tests
def test_sae_under_two_process_ddp_learns_from_every_rank(
    synthetic_dir: Path, tmp_path: Path
) -> None:
    """Real 2-process DDP (gloo): both ranks' embeddings reach the SAE, during training (the
    gathered buffer) and at the end (an equal share of final_samples from each rank). Rank 0
    alone reads 8 of the 16 train shards, 2000 samples, so 2400 rows prove the gather."""
    out = tmp_path / "ddp_sae"
    run_train_process(
        synthetic_dir, out, tmp_path,
        "trainer=ddp_cpu", "callbacks=sae", "trainer.max_epochs=1",
        "trainer.limit_train_batches=4", "trainer.limit_val_batches=1",
        "callbacks.sae.every_n_steps=2", "callbacks.sae.n_latents=64",
        "callbacks.sae.final_samples=2400", "callbacks.sae.final_epochs=5",
    )  # fmt: skip
    final = json.loads((out / "sae" / "metrics.json").read_text())
    assert final["text"]["n"] == final["image"]["n"] == 2400
    assert final["text"]["fvu"] < 1 and final["image"]["fvu"] < 1
    rows = _logged(out)
    buffer_rows = [
        float(r["sae/image/buffer_rows"]) for r in rows if r.get("sae/image/buffer_rows")
    ]
    assert buffer_rows == [256.0, 512.0]  # 2 ranks x 64 per step, after steps 2 and 4
    assert load_sae(out / "sae" / "text_sae.safetensors").cfg.n_latents == 64


class RecordSAEUpdates(L.Callback):
    """After the SAE callback's batch hook: (global step, Adam steps of the text SAE) at each
    update, i.e. how far the during-training SAE has been trained."""

    def __init__(self, sae_cb: SAECallback) -> None:
        self.sae_cb, self.updates = sae_cb, []

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if self.sae_cb._batches % self.sae_cb.every_n_steps == 0:
            opt = self.sae_cb.opts["text"]
            adam_steps = int(next(iter(opt.state.values()))["step"])
            self.updates.append((trainer.global_step, adam_steps))


def test_requeued_run_continues_the_during_training_sae(
    synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Slurm requeue mid-epoch: the checkpoint carries the during-training SAEs, their Adam
    state and the batch count, so the resumed run updates at the uninterrupted run's steps and
    goes on training the same SAE (a fresh one would restart at 2 Adam steps, at step 9)."""
    from fairclip.cluster import SlurmRequeue
    from fairclip.training import build

    monkeypatch.setattr("fairclip.cluster.requeue_slurm_job", lambda: True)
    overrides = [
        "callbacks=sae", "trainer.max_epochs=2", "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=1", "export=false", "callbacks.sae.every_n_steps=2",
        "callbacks.sae.steps_per_update=2", "callbacks.sae.n_latents=64",
        "callbacks.sae.final_samples=256", "callbacks.sae.final_epochs=2",
    ]  # fmt: skip

    def start(run_dir: Path, *signal_cbs: L.Callback) -> tuple[L.Trainer, RecordSAEUpdates, tuple]:
        module, dm, trainer = build(
            compose_train(small_run_overrides(synthetic_dir, *overrides), run_dir)
        )
        (sae_cb,) = [c for c in trainer.callbacks if isinstance(c, SAECallback)]
        probe = RecordSAEUpdates(sae_cb)
        trainer.callbacks.insert(trainer.callbacks.index(sae_cb) + 1, probe)
        if signal_cbs:  # SlurmRequeue last, after every batch hook, as cluster_plugins adds it
            signal_at, requeue = signal_cbs
            trainer.callbacks[:0] = [signal_at]
            trainer.callbacks.append(requeue)
        return trainer, probe, (module, dm)

    trainer, reference, fit_args = start(tmp_path / "ref")
    trainer.fit(*fit_args)
    assert reference.updates == [(2, 2), (4, 4), (6, 6), (8, 8), (10, 10)]

    class SignalAtStep7(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            if trainer.global_step == 7:
                os.kill(os.getpid(), signal.SIGUSR1)

    trainer, first, fit_args = start(tmp_path / "cut", SignalAtStep7(), SlurmRequeue())
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        with pytest.raises(SystemExit):
            trainer.fit(*fit_args)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    ckpt = tmp_path / "cut" / "hpc_ckpt_1.ckpt"
    (state,) = [
        v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items() if "SAE" in k
    ]
    assert state["batches"] == 7 and set(state["saes"]) == {"text", "image"}

    trainer, second, fit_args = start(tmp_path / "cut")
    trainer.fit(*fit_args, ckpt_path=str(ckpt))
    assert first.updates + second.updates == reference.updates


def test_checkpointed_sae_of_another_width_names_the_mismatch(tmp_path: Path) -> None:
    """Resuming a run whose model changed embedding size stops with both sizes, not a
    shape error deep in load_state_dict."""
    saved = SAECallback(tmp_path, n_latents=32)
    saved._sae_for("text", 8, torch.device("cpu"))
    resumed = SAECallback(tmp_path, n_latents=32)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.state_dict()["saes"]["text"]["config"]["d_in"] == 8  # kept until used
    with pytest.raises(ValueError, match="checkpoint's text SAE takes 8-dim embeddings, the "
                       "model gives 16"):  # fmt: skip
        resumed._sae_for("text", 16, torch.device("cpu"))


def test_top_activating_captions_decode_with_clip_and_hf_tokenizers() -> None:
    """The top-activating table shows captions, not placeholders, for open_clip's own
    tokenizer and for an HF text tower's (model=minilm_clip)."""
    from types import SimpleNamespace

    from fairclip.model.factory import create_model

    captions = ["a photo of a nurse", "a chef at work"]
    for name in ("fairclip-tiny", "fairclip-minilm"):
        tokenizer = create_model(name).tokenizer
        module = SimpleNamespace(tokenizer=tokenizer)
        assert SAECallback._decode(module, tokenizer(captions)) == captions, name
