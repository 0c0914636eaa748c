"""End to end through composed Hydra configs: learning, bias, resume, DDP, config errors."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException

from fairclip.cli.data import main as data_main
from fairclip.training import build, train
from tests.conftest import compose_train, run_app, run_train_process, small_run_overrides


def last_metrics(output_dir: Path) -> dict[str, float]:
    """The last logged value of every metric in the CSV log."""
    out: dict[str, float] = {}
    with open(output_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


@pytest.fixture(scope="module")
def balanced_dir(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Path:
    """Same size as the biased fixture, but P(gender | concept) = 1/2."""
    out = tmp_path_factory.mktemp("balanced")
    run_app(data_main, ["source=synthetic", f"out={out}", "train_size=4000", "shard_size=250", "splits=[train]",
               "synthetic.association=0.5", "synthetic.male_share=0.5"])  # fmt: skip
    os.symlink(synthetic_dir / "eval", out / "eval")
    return out


@pytest.mark.slow  # minutes on 2 cores: CI runs it with the slow tests
def test_demo_learns_concepts_and_shows_planted_bias(
    synthetic_dir: Path, balanced_dir: Path, tmp_path: Path
) -> None:
    results = {}
    for name, data in (("biased", synthetic_dir), ("balanced", balanced_dir)):
        cfg = compose_train(
            small_run_overrides(data, "trainer.max_epochs=4", "export=false"), tmp_path / name
        )
        metrics = train(cfg)
        results[name] = metrics
    chance = 1 / 8
    for name, m in results.items():
        assert m["val/acc"] >= 3 * chance, (
            f"{name} run did not learn the concepts: {m['val/acc']:.3f}"
        )
    gap = {n: m["val/class_group_gap/gender"] for n, m in results.items()}
    ndkl = {n: m["val/ndkl@10/gender/eq_opp"] for n, m in results.items()}
    # The planted association shows where images are ambiguous: the biased model calls female
    # doctors nurses (and male nurses doctors) far more often than the balanced-data model, and
    # its concept queries retrieve a more gender-skewed top-10.
    assert gap["biased"] > gap["balanced"] + 0.15, gap
    assert ndkl["biased"] > ndkl["balanced"], ndkl


def test_resume_continues_step_count_and_lr_schedule(synthetic_dir: Path, tmp_path: Path) -> None:
    common = ["trainer.max_steps=8", "trainer.max_epochs=-1", "trainer.limit_train_batches=4",
              "trainer.limit_val_batches=1", "module.warmup_steps=2", "export=false"]  # fmt: skip

    # uninterrupted reference run
    ref_cfg = compose_train(small_run_overrides(synthetic_dir, *common), tmp_path / "ref")
    ref_module, ref_dm, ref_trainer = build(ref_cfg)
    ref_trainer.fit(ref_module, datamodule=ref_dm)
    ref_lr = ref_trainer.optimizers[0].param_groups[0]["lr"]
    assert ref_trainer.global_step == 8

    # the same run stopped after its first epoch (as a preempted job would be) ...
    class StopAfterFirstEpoch(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            trainer.should_stop = True

    cut_cfg = compose_train(small_run_overrides(synthetic_dir, *common), tmp_path / "cut")
    module, dm, trainer = build(cut_cfg)
    trainer.callbacks.insert(0, StopAfterFirstEpoch())
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 4
    cut_lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert cut_lr > ref_lr  # cosine still high mid-way
    # a fresh run into that run dir (ckpt_path forgotten) is refused before it touches it
    before = sorted(p.name for p in (tmp_path / "cut").rglob("*"))
    with pytest.raises(FileExistsError, match=r"hydra.run.dir=.*cut: already holds a run"):
        train(cut_cfg)
    assert sorted(p.name for p in (tmp_path / "cut").rglob("*")) == before

    # ... and resumed from its last checkpoint
    resume_cfg = compose_train(
        small_run_overrides(synthetic_dir, *common, "ckpt_path=last"), tmp_path / "cut"
    )
    module, dm, trainer = build(resume_cfg)
    trainer.fit(module, datamodule=dm, ckpt_path=resume_cfg.ckpt_path)
    assert trainer.global_step == 8
    assert trainer.current_epoch == 2
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(ref_lr, abs=1e-12)
    torch.testing.assert_close(module.model.logit_scale, ref_module.model.logit_scale)


@pytest.mark.slow  # minutes on 2 cores: CI runs it with the slow tests
def test_two_process_ddp_on_cpu_sees_disjoint_data(synthetic_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    proc = run_train_process(
        synthetic_dir, out, tmp_path,
        "trainer=ddp_cpu", "callbacks=audit", "trainer.max_epochs=1",
        "trainer.limit_train_batches=6", "trainer.limit_val_batches=2",
    )  # fmt: skip
    keys = [(out / "seen_keys" / f"rank{r}-epoch0.txt").read_text().split() for r in range(2)]
    assert len(keys[0]) == len(keys[1]) == 6 * 64
    assert not set(keys[0]) & set(keys[1])
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "export" / "open_clip_model.safetensors").is_file()
    assert "val/acc" in last_metrics(out)
    assert "sync_dist" not in proc.stderr  # metrics synced by torchmetrics, logged without nagging
    # one run dir, one config: DDP children must not create their own
    assert len(list(tmp_path.glob("**/.hydra/config.yaml"))) == 1

    # fairclip-export of the Lightning checkpoint equals the automatic end-of-training export
    from fairclip.cli.export import main as export_main
    from fairclip.loading import load_model

    run_app(
        export_main,
        [f"model.name={out / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'from_ckpt'}"],
    )
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = load_model(str(tmp_path / "from_ckpt")).model.encode_image(images)
        b = load_model(str(out / "export")).model.encode_image(images)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_config_errors_name_the_key(synthetic_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException, match="model/nonexistent"):
        compose_train(["model=nonexistent"], tmp_path)
    cfg = compose_train(small_run_overrides(synthetic_dir, "model.name=ViT-Q-99"), tmp_path)
    with pytest.raises(ValueError, match=r"config key 'module'.*model.name='ViT-Q-99'"):
        build(cfg)
    cfg = compose_train(small_run_overrides(synthetic_dir, "data.batch_size=0"), tmp_path)
    with pytest.raises(
        ValueError, match=r"config key 'data'.*data.batch_size=0: expected a positive integer"
    ):
        build(cfg)
    cfg = compose_train(
        small_run_overrides(synthetic_dir, f"data.train_shards={tmp_path}/nope"), tmp_path
    )
    module, dm, _ = build(cfg)
    with pytest.raises(FileNotFoundError, match=r"data.train_shards.*nope"):
        dm.setup("fit")
    # a resume point that is not there stops the run (Lightning would start from scratch)
    for resume, match in (
        ("last", r"ckpt_path=last: no last.ckpt in .*fresh"),
        (f"{tmp_path}/x.ckpt", r"ckpt_path='.*x.ckpt': checkpoint file not"),
    ):
        cfg = compose_train(
            small_run_overrides(synthetic_dir, f"ckpt_path={resume}"), tmp_path / "fresh"
        )
        with pytest.raises(FileNotFoundError, match=match):
            train(cfg)
    broken = tmp_path / "broken.ckpt"  # e.g. a copy cut short
    broken.write_bytes(b"PK\x03\x04 not a whole archive")
    cfg = compose_train(
        small_run_overrides(synthetic_dir, f"ckpt_path={broken}"), tmp_path / "fresh"
    )
    with pytest.raises(ValueError, match=r"ckpt_path='.*broken.ckpt': not a readable checkpoint"):
        train(cfg)
    assert not list((tmp_path / "fresh").glob("**/*.ckpt"))


def test_demo_lit_fine_tunes_only_the_text_tower_of_a_pretrained_model(
    trained_run: Path, synthetic_dir: Path, tmp_path: Path
) -> None:
    """experiment=demo_lit: the image tower is the pretrained one, bit for bit, after training;
    the text tower moved (the bias can only be learned there)."""
    from safetensors.torch import load_file

    pretrained = trained_run / "export" / "open_clip_model.safetensors"
    overrides = small_run_overrides(synthetic_dir, "trainer.max_steps=4", "trainer.max_epochs=1")
    overrides = [o.replace("experiment=demo", "experiment=demo_lit") for o in overrides]
    with pytest.raises(ValueError, match=r"module.lock_image=true .* model.pretrained"):
        train(compose_train(overrides, tmp_path / "missing"))  # a locked random tower: refused
    train(compose_train([*overrides, f"model.pretrained={pretrained}"], tmp_path / "run"))
    before = load_file(pretrained)
    after = load_file(tmp_path / "run" / "export" / "open_clip_model.safetensors")
    assert before.keys() == after.keys()
    visual = [k for k in before if k.startswith("visual.")]
    text = [k for k in before if k.startswith(("transformer.", "token_embedding", "ln_final"))]
    assert visual and text
    assert all(torch.equal(before[k], after[k]) for k in visual)
    assert sum(not torch.equal(before[k], after[k]) for k in text) > len(text) // 2


def test_resume_point_from_another_data_layout_restarts_the_epoch_with_a_warning(
    synthetic_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The saved batch count means the same samples only under the same plan: a changed
    batch size must not skip 3 batches of a different order, it restarts the epoch, saying so."""
    _, dm, _ = build(compose_train(small_run_overrides(synthetic_dir), tmp_path))
    dm.setup("fit")
    saved = {"train_epoch": 0, "train_batches": 3, "train_layout": dm.train_stream.layout()}
    dm.load_state_dict(saved)
    dm.train_dataloader()
    assert dm.train_stream.resume_point == (0, 3)

    dm.train_stream.resume_point = None
    with caplog.at_level(logging.WARNING, logger="fairclip.data.datamodule"):
        dm.load_state_dict({**saved, "train_layout": {**saved["train_layout"], "batch_size": 32}})
        dm.train_dataloader()
    assert dm.train_stream.resume_point is None
    assert "batch_size changed" in caplog.text and "restarts from its first batch" in caplog.text


@pytest.mark.slow  # minutes on 2 cores: CI runs it with the slow tests
def test_bf16_mixed_trains_with_fp32_weights_and_sae(
    synthetic_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`trainer=gpu`'s precision, bf16-mixed, on CPU autocast: the loss falls, the weights and
    the export stay fp32, and the SAE callback (fed the step's bf16 embeddings) still learns."""
    from safetensors.torch import load_file

    overrides = small_run_overrides(
        synthetic_dir, "trainer.precision=bf16-mixed", "trainer.max_epochs=1",
        "trainer.limit_train_batches=30", "trainer.limit_val_batches=2", "callbacks=sae",
        "callbacks.sae.every_n_steps=5",
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="fairclip.training"):
        metrics = train(compose_train(overrides, tmp_path))
    # the console ends with the final validation metrics, per-value accuracies left out
    summary = next(r.message for r in caplog.records if r.message.startswith("final validation"))
    assert re.search(rf"\n  val/acc +{metrics['val/acc']:.4f}\n", summary), summary
    assert "val/worst_group_acc/gender" in summary and "gender=female" not in summary
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 2 and losses[-1] < losses[0] - 0.2, losses
    sae_fvu = [float(r["sae/text/fvu"]) for r in rows if r.get("sae/text/fvu")]
    assert sae_fvu and all(torch.isfinite(torch.tensor(sae_fvu))), sae_fvu
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert {v.dtype for v in ckpt["state_dict"].values() if v.is_floating_point()} == {
        torch.float32
    }
    exported = load_file(tmp_path / "export" / "open_clip_model.safetensors")
    assert {v.dtype for v in exported.values()} == {torch.float32}
    final = json.loads((tmp_path / "sae" / "metrics.json").read_text())
    # what training optimises: the TopK reconstruction (keep-all inference of the MSAE preset
    # needs far more embeddings than a test run has; docs/methods.md#matryoshka-topk-sae)
    assert final["text"]["fvu_topk"] < 0.05 and final["image"]["fvu_topk"] < 0.05, final
    assert final["text"]["fvu"] < 1 and final["image"]["fvu"] < 1, final


def test_demo_minilm_trains_the_image_tower_against_the_locked_pretrained_text_tower(
    synthetic_dir: Path, tmp_path: Path
) -> None:
    """experiment=demo_minilm: the packaged MiniLM text tower needs no pretrained= (it is the
    pretrained part), stays bit for bit, and runs without dropout; the image tower learns."""
    from safetensors.torch import load_file

    from fairclip.loading import load_model
    from fairclip.model.factory import create_model

    overrides = small_run_overrides(synthetic_dir, "trainer.max_steps=4", "trainer.max_epochs=1")
    overrides = [o.replace("experiment=demo", "experiment=demo_minilm") for o in overrides]
    module = build(compose_train(overrides, tmp_path / "probe"))[0]
    module.train()
    assert not module.model.text.training and module.model.visual.training
    train(compose_train(overrides, tmp_path / "run"))
    reference = create_model("fairclip-minilm").model.eval()  # the tower as it starts
    start = reference.state_dict()
    after = load_file(tmp_path / "run" / "export" / "open_clip_model.safetensors")
    text = [k for k in after if k.startswith("text.")]
    visual = [k for k in after if k.startswith("visual.")]
    assert len(text) > 50 and visual
    assert all(torch.equal(start[k], after[k]) for k in text)
    assert sum(not torch.equal(start[k], after[k]) for k in visual) > len(visual) // 2
    # the run dir reloads with the same text embeddings (the export names the packaged model)
    reloaded = load_model(str(tmp_path / "run"))
    prompts = reloaded.tokenizer(["a photo of a nurse."])
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.model.encode_text(prompts),
            reference.encode_text(prompts),
            atol=1e-5,
            rtol=0,
        )

    # experiment=demo_minilm_lit on that export: the image tower is locked, MiniLM is tuned
    lit = small_run_overrides(
        synthetic_dir, "trainer.max_steps=2", "trainer.max_epochs=1",
        f"model.pretrained={tmp_path / 'run' / 'export' / 'open_clip_model.safetensors'}",
    )  # fmt: skip
    lit = [o.replace("experiment=demo", "experiment=demo_minilm_lit") for o in lit]
    train(compose_train(lit, tmp_path / "lit"))
    tuned = load_file(tmp_path / "lit" / "export" / "open_clip_model.safetensors")
    assert all(torch.equal(after[k], tuned[k]) for k in visual)
    assert sum(not torch.equal(after[k], tuned[k]) for k in text) > len(text) // 2


def test_demo_minilm_lit_is_the_documented_override_set(tmp_path: Path) -> None:
    """README's MiniLM-LiT numbers came from experiment=demo_minilm plus these overrides."""
    weights = "model.pretrained=w.safetensors"
    by_name = compose_train(["experiment=demo_minilm_lit", weights], tmp_path)
    by_hand = compose_train(
        ["experiment=demo_minilm", weights, "data.train_shards=${paths.data_dir}/synthetic/train",
         "module.lock_text=false", "module.lock_image=true", "module.lr=1e-4",
         "trainer.max_epochs=3", "task_name=demo_minilm_lit"], tmp_path,
    )  # fmt: skip
    assert by_name.model == by_hand.model and by_name.trainer == by_hand.trainer
    assert by_name.data == by_hand.data and by_name.data.train_shards.endswith("synthetic/train")
