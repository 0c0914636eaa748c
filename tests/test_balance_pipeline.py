"""fairclip-balance on real shards: annotation, M4 vs group baseline, shards and report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from fairclip.balance.annotate import Annotations, Annotator
from fairclip.balance.m4 import M4InfeasibleError
from fairclip.balance.pipeline import balance_shards, balanced_shards
from fairclip.data.shards import list_shards
from fairclip.runtime import CONF_DIR


def balance_cfg(*overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="balance", overrides=["paths.root_dir=/tmp", *overrides])
    return cfg.balance


def report_of(out: Path) -> dict:
    return json.loads((out.with_name(out.name + "_report") / "balance_report.json").read_text())


@pytest.fixture(scope="module")
def m4_output(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("m4") / "train_m4"
    # association 0.9 in the fixture: independence needs eta <= ~0.2
    cfg = balance_cfg("balance.eta=0.18", "+balance.targets.age=prior", f"balance.output={out}")
    return balance_shards(cfg, str(synthetic_dir / "train"))


def test_m4_meets_tolerances_and_writes_balanced_shards(
    m4_output: Path, synthetic_dir: Path
) -> None:
    report = report_of(m4_output)
    before, expected, after = (
        report["data_bias"][k] for k in ("before", "expected_after", "after")
    )
    assert before["ab"] > 0.18  # P(doctor|male) - P(doctor|female) = 0.225 - 0.025
    assert expected["ab"] <= 0.03 + 1e-3 and expected["rb"] <= 0.02 + 1e-3
    assert after["ab"] < 0.08  # the Bernoulli sample of ~700 rows stays close
    assert report["kept_fraction"] == pytest.approx(0.18, abs=0.02)
    kept = list_shards(m4_output)
    assert sum(s.size for s in kept) == report["kept"]
    ann = Annotations.load(m4_output.with_name(m4_output.name + "_report") / "annotations.parquet")
    assert len(ann.keys) == 4000 and ann.s.shape == (4000, 2)
    import webdataset as wds

    out_keys = [s["__key__"] for s in wds.WebDataset([s.url for s in kept], shardshuffle=False)]
    assert set(out_keys) <= set(ann.keys) and len(out_keys) == len(set(out_keys)) == report["kept"]
    assert {"png", "txt", "json"} <= set(
        next(iter(wds.WebDataset(kept[0].url, shardshuffle=False)))
    )


def test_rerun_reuses_and_settings_change_the_output(m4_output: Path, synthetic_dir: Path) -> None:
    cfg = balance_cfg(
        "balance.eta=0.18", "+balance.targets.age=prior", f"balance.output={m4_output}"
    )
    stamp = (m4_output / "sizes.json").stat().st_mtime
    assert balance_shards(cfg, str(synthetic_dir / "train")) == m4_output
    assert (m4_output / "sizes.json").stat().st_mtime == stamp
    # the same explicit balance.output with other settings: refused, not silently reused
    other = balance_cfg(
        "balance.eta=0.3", "+balance.targets.age=prior", f"balance.output={m4_output}"
    )
    with pytest.raises(FileExistsError, match=r"balance.output=.*other settings.*eta: 0.18 -> 0.3"):
        balance_shards(other, str(synthetic_dir / "train"))
    assert (m4_output / "sizes.json").stat().st_mtime == stamp
    a = balance_cfg("balance.eta=0.18")
    b = balance_cfg("balance.eta=0.2")
    from fairclip.balance.pipeline import resolve_output

    assert resolve_output(a, str(synthetic_dir / "train")) != resolve_output(
        b, str(synthetic_dir / "train")
    )


def test_group_balancing_leaves_the_association_m4_removes(
    synthetic_dir: Path, tmp_path: Path, m4_output: Path
) -> None:
    cfg = balance_cfg(
        "balance=group",
        "balance.eta=0.18",
        "+balance.targets.age=prior",
        f"balance.output={tmp_path / 'g'}",
    )
    group = report_of(balance_shards(cfg, str(synthetic_dir / "train")))
    m4 = report_of(m4_output)
    assert group["data_bias"]["expected_after"]["rb"] < 0.02  # first order fixed ...
    assert group["data_bias"]["expected_after"]["ab"] > 0.15  # ... second order left intact
    assert m4["data_bias"]["expected_after"]["ab"] < 0.05


def test_infeasible_missing_and_unknown_inputs_are_clear_errors(
    synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = balance_cfg("balance.eta=0.9", f"balance.output={tmp_path / 'x'}")
    with pytest.raises(M4InfeasibleError, match=r"infeasible.*eta"):
        balance_shards(cfg, str(synthetic_dir / "train"))
    # a rank that reads the balanced shards before they exist is told who writes them
    with pytest.raises(FileNotFoundError, match=r"x holds no sizes.json: .*global rank 0"):
        balanced_shards(cfg, str(synthetic_dir / "train"))
    assert not (tmp_path / "x").exists()
    annotator = Annotator(
        {"gender": ["female", "male"]}, ["doctor", "nurse"], label_fields=["concept"]
    )
    with pytest.raises(ValueError, match=r"x.tar: sample 'k'.*attribute 'gender' missing"):
        annotator({"concept": "doctor"}, "a photo of a doctor", "x.tar: sample 'k'")
    with pytest.raises(ValueError, match=r"concept='pirate': 'pirate' is not in balance.labels"):
        annotator({"gender": "male", "concept": "pirate"}, "", "x.tar: sample 'k'")
    with pytest.raises(ValueError, match=r"balance.group_keywords.gender: unknown value 'robot'"):
        Annotator(
            {"gender": ["female", "male"]},
            ["doctor"],
            group_keywords={"gender": {"robot": ["bot"]}},
        )


def test_caption_keywords_give_groups_and_labels() -> None:
    annotator = Annotator(
        {"gender": ["female", "male"]},
        ["doctor", "nurse"],
        label_keywords={"doctor": ["doctor", "physician"], "nurse": ["nurse"]},
        group_keywords={"gender": {"female": ["woman", "she"], "male": ["man", "he"]}},
    )
    groups, labels, _ = annotator({}, "A woman physician and a nurse.", "here")
    assert groups == [0] and labels == [0, 1]


def test_train_with_balance_m4_uses_balanced_shards_and_logs_report(
    synthetic_dir: Path, m4_output: Path, tmp_path: Path
) -> None:
    from lightning.pytorch.loggers import WandbLogger

    from fairclip.training import build
    from tests.conftest import compose_train, small_run_overrides

    overrides = [o for o in small_run_overrides(synthetic_dir) if o != "logger=csv"]
    cfg = compose_train(
        [*overrides, "balance=m4", "balance.eta=0.18", "+balance.targets.age=prior",
         f"balance.output={m4_output}", "logger=default", "logger.wandb.id=balanced-run",
         "trainer.max_steps=1", "trainer.limit_val_batches=0", "callbacks=none"],
        tmp_path,
    )  # fmt: skip
    module, dm, trainer = build(cfg)
    trainer.fit(module, datamodule=dm)  # prepare_data + setup: reuses the balanced shards
    assert dm.train_shards == str(m4_output)  # the balanced shards, reused (same settings)
    wandb_logger = next(lg for lg in trainer.loggers if isinstance(lg, WandbLogger))
    wandb_logger.experiment.finish()
    tables = list(
        tmp_path.glob("wandb/offline-run-*/files/media/table/balance/data_bias*.table.json")
    )
    assert len(tables) == 1
    rows = json.loads(tables[0].read_text())["data"]
    assert [r[0] for r in rows] == ["before", "expected_after", "after"]
    assert rows[0][2] > 0.18 and rows[1][2] < 0.05  # AB before / expected after


@pytest.mark.slow
def test_ddp_ranks_train_on_shards_rank0_balances_and_stop_when_it_fails(
    synthetic_dir: Path, tmp_path: Path
) -> None:
    """trainer=ddp_cpu (2 processes): global rank 0 writes the balanced shards in
    prepare_data, both ranks train on them; when rank 0 fails there (infeasible eta), the
    whole run stops at once with its error instead of the other rank waiting at a barrier."""
    import subprocess
    import sys
    import time

    from tests.conftest import run_train_process, small_run_overrides

    out = tmp_path / "balanced"
    common = ["trainer=ddp_cpu", "balance=m4", "+balance.targets.age=prior", "callbacks=none",
              "balance.shard_size=100",
              "trainer.max_steps=2", "trainer.limit_val_batches=0"]  # fmt: skip
    run_train_process(
        synthetic_dir, tmp_path / "run", tmp_path / "logs",
        *common, "balance.eta=0.18", f"balance.output={out}",
    )  # fmt: skip
    assert (out / "sizes.json").is_file() and report_of(out)["kept"] > 0

    cmd = [str(Path(sys.executable).parent / "fairclip-train"),
           *small_run_overrides(synthetic_dir, *common, "balance.eta=0.9",
                                f"balance.output={tmp_path / 'infeasible'}"),
           f"hydra.run.dir={tmp_path / 'failed'}", f"paths.log_dir={tmp_path / 'logs'}"]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and time.monotonic() - start < 240
    assert "M4 infeasible" in proc.stdout + proc.stderr
    assert not (tmp_path / "infeasible" / "sizes.json").exists()
