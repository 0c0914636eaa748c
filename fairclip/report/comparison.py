"""Compare two or more bias reports (e.g. before/after debiasing): JSON, markdown, plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fairclip.files import atomic_write_text
from fairclip.report.io import COMPARISON_SCHEMA, flatten_metrics, load_report, save_json
from fairclip.report.markdown import comparison_markdown
from fairclip.report.plots import plot_comparison
from fairclip.report.wandb_log import log_to_wandb


def _default_labels(reports: Sequence[Mapping[str, Any]]) -> list[str]:
    labels = [Path(r["source"]).parent.name or f"run{i}" for i, r in enumerate(reports)]
    if len(set(labels)) < len(labels):
        labels = [f"run{i}:{label}" for i, label in enumerate(labels)]
    return labels


def compare_reports(
    sources: Sequence[str | Path],
    out_dir: str | Path,
    labels: Sequence[str] | None = None,
    plots: bool = True,
    wandb: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``comparison.json``, ``comparison.md`` and ``comparison.png`` into ``out_dir``.

    ``sources`` are report.json files or directories holding one; ``labels`` name the runs
    (default: their directory names). Deltas are last minus first.
    """
    if len(sources) < 2:
        raise ValueError(f"compare: expected at least two report.json files, got {list(sources)}")
    reports = [load_report(s) for s in sources]
    labels = list(labels) if labels else _default_labels(reports)
    if len(labels) != len(reports) or len(set(labels)) != len(labels):
        raise ValueError(
            f"compare_labels={labels}: expected {len(reports)} distinct labels, one per report"
        )
    flats = [flatten_metrics(r) for r in reports]
    shared = [k for k in flats[0] if all(k in f for f in flats[1:])]
    if not shared:
        raise ValueError(f"compare: the reports {list(sources)} share no metric")
    comparison: dict[str, Any] = {
        "schema": COMPARISON_SCHEMA,
        "runs": [
            {"label": label, "source": r["source"], "model": r.get("model", {})}
            for label, r in zip(labels, reports, strict=True)
        ],
        "metrics": {k: [f[k] for f in flats] for k in shared},
        "delta": {k: flats[-1][k] - flats[0][k] for k in shared},
    }
    out = Path(out_dir)
    files: dict[str, Path] = {"json": out / "comparison.json", "md": out / "comparison.md"}
    plot_rel = None
    if plots:
        files["plot:comparison"] = plot_comparison(reports, labels, out / "comparison.png")
        plot_rel = "comparison.png"
    save_json(comparison, files["json"])
    atomic_write_text(files["md"], comparison_markdown(reports, labels, plot_rel) + "\n")
    if wandb is not None:
        log_to_wandb(comparison, files, out, **wandb)
    comparison["files"] = {k: str(v) for k, v in files.items()}
    return comparison
