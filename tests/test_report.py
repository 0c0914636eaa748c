"""Report rendering: strict JSON, markdown tables, plots, comparison and wandb (offline)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fairclip.report import (
    REPORT_SCHEMA,
    compare_reports,
    flatten_metrics,
    headline_keys,
    load_report,
    log_to_wandb,
    write_report,
)

ATTRS = {"gender": ["female", "male"], "age": ["young", "old"]}


def make_report(acc: float, skew: float, spec: str) -> dict:
    """A small hand-written report in the shape evaluate_model returns."""
    return {
        "schema": REPORT_SCHEMA,
        "created": "2026-01-01T00:00:00",
        "model": {"spec": spec, "name": "fairclip-tiny"},
        "settings": {
            "attributes": ATTRS,
            "concepts": ["doctor", "nurse"],
            "skew_ks": [2, 4],
            "recall_ks": [1],
            "targets": ["eq_opp"],
            "able_query_set": "concepts",
            "association_words": ["doctor", "nurse"],
        },
        "splits": {
            "eval": {
                "images": 8,
                "labelled": 8,
                "captioned": 0,
                "skipped": 0,
                "shards": "/data/eval",
                "group_counts": {"gender": {"female": 4, "male": 4}, "age": {"young": 8, "old": 0}},
            }
        },
        "metrics": {
            "zeroshot": {
                "acc": acc,
                "acc/gender=female": acc - 0.1,
                "acc/gender=male": acc + 0.1,
                "worst_group_acc/gender": acc - 0.1,
                "group_gap/gender": 0.2,
                "acc/age=young": acc,
                "acc/age=old": float("nan"),  # no image: NaN, written as null
                "worst_group_acc/age": acc,
                "group_gap/age": 0.0,
            },
            "skew": {
                "concepts": {
                    "maxskew@2/gender/eq_opp": skew,
                    "minskew@2/gender/eq_opp": -skew,
                    "ndkl@2/gender/eq_opp": skew / 2,
                }
            },
            "bias": {"rb/gender/eq_opp": 0.25, "ab/gender": 0.5, "cramers_v/gender": 0.4},
            "able": {"able@2/gender/eq_opp": 2 / (1 / acc + math.exp(skew))},
        },
        "cells": {  # accuracy per (concept, value): NaN where a cell had no image
            "gender": {
                "doctor": {"female": acc - 0.25, "male": 1.0},
                "nurse": {"female": 1.0, "male": float("nan")},
            }
        },
        "queries": {
            "concepts": {
                "split": "eval",
                "attributes": ["gender"],
                "prompts": ["a photo of a doctor.", "a photo of a nurse."],
                "values": {
                    "maxskew@2/gender/eq_opp": [skew + 0.1, skew - 0.1],
                    "minskew@2/gender/eq_opp": [-skew, -skew],
                    "ndkl@2/gender/eq_opp": [skew / 2, skew / 2],
                },
            }
        },
    }


def test_write_report_is_strict_json_markdown_and_plots(tmp_path: Path) -> None:
    files = write_report(make_report(0.75, 0.693, "runA"), tmp_path)
    raw = (tmp_path / "report.json").read_text()
    assert "NaN" not in raw  # strict JSON for any reader
    assert json.loads(raw)["metrics"]["zeroshot"]["acc/age=old"] is None
    loaded = load_report(tmp_path)  # a directory works too
    assert math.isnan(loaded["metrics"]["zeroshot"]["acc/age=old"])
    flat = flatten_metrics(loaded)
    assert flat["skew/concepts/maxskew@2/gender/eq_opp"] == pytest.approx(0.693)
    assert headline_keys(loaded)[:3] == [
        "zeroshot/acc",
        "zeroshot/worst_group_acc/gender",
        "zeroshot/group_gap/gender",
    ]

    md = (tmp_path / "report.md").read_text()
    assert "| gender | female | 0.650 | 4 |" in md
    assert "| age | old | n/a | 0 |" in md
    assert "| concept | female | male |" in md and "| doctor | 0.500 | 1.000 |" in md
    assert "| nurse | 1.000 | n/a |" in md
    assert "| gender | 2 | eq_opp | 0.693 | -0.693 | 0.346 |" in md
    assert "| gender | 0.250 | 0.500 | 0.400 |" in md  # RB, AB, Cramér's V
    assert "- `a photo of a doctor.`: 0.793" in md  # most skewed query first
    for name in ("group_accuracy", "skew_concepts"):
        assert files[f"plot:{name}"].read_bytes()[:4] == b"\x89PNG"
        assert f"![{name}](plots/{name}.png)" in md
    assert not list(tmp_path.rglob("*.tmp*"))  # atomic writes leave no temporaries


def test_compare_reports_renders_both_runs_and_deltas(tmp_path: Path) -> None:
    write_report(make_report(0.80, 0.50, "before-model"), tmp_path / "a", plots=False)
    write_report(make_report(0.70, 0.10, "after-model"), tmp_path / "b", plots=False)
    out = tmp_path / "cmp"
    comparison = compare_reports(
        [tmp_path / "a" / "report.json", tmp_path / "b"], out, labels=["before", "after"]
    )
    assert comparison["delta"]["zeroshot/acc"] == pytest.approx(-0.10)
    md = (out / "comparison.md").read_text()
    assert "| `zeroshot/acc` | 0.800 | 0.700 | -0.100 |" in md
    assert "| `skew/concepts/maxskew@2/gender/eq_opp` | 0.500 | 0.100 | -0.400 |" in md
    assert "`before-model`" in md and "`after-model`" in md
    assert "| `zeroshot/acc/age=old` | n/a | n/a | n/a |" in md
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "comparison.json").read_text())["runs"][1]["label"] == "after"
    default = compare_reports([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp2", plots=False)
    assert [r["label"] for r in default["runs"]] == ["a", "b"]


def test_report_errors_name_the_file(tmp_path: Path) -> None:
    write_report(make_report(0.8, 0.5, "x"), tmp_path / "a", plots=False)
    with pytest.raises(ValueError, match="at least two report.json"):
        compare_reports([tmp_path / "a"], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"nope: report not found"):
        load_report(tmp_path / "nope")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match=r"other.json: not a fairclip bias report"):
        load_report(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"broken.json: not valid JSON"):
        load_report(tmp_path / "broken.json")
    with pytest.raises(ValueError, match=r"compare_labels=\['x', 'x'\]: expected 2 distinct"):
        compare_reports([tmp_path / "a", tmp_path / "a"], tmp_path / "out", labels=["x", "x"])


def test_wandb_offline_run_holds_the_report_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    report = make_report(0.75, 0.693, "runA")
    files = write_report(report, tmp_path)
    run_dir = log_to_wandb(report, files, tmp_path, name="test", offline=True, run_id="abc123")
    assert run_dir.parent == tmp_path / "wandb" and run_dir.name.startswith("offline-run-")
    media = run_dir / "files" / "media"
    metrics = json.loads(
        next((media / "table" / "bias_eval").glob("metrics_*.table.json")).read_text()
    )
    assert metrics["columns"] == ["metric", "value"]
    assert ["skew/concepts/maxskew@2/gender/eq_opp", pytest.approx(0.693)] in metrics["data"]
    groups = json.loads(next((media / "table" / "bias_eval").glob("group_accuracy_*")).read_text())
    assert ["gender", "female", pytest.approx(0.65), 4] in groups["data"]
    assert len(list((media / "images" / "bias_eval" / "plots").glob("*.png"))) == 2
