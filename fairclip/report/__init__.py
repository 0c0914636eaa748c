"""Bias reports: JSON, markdown, plots, wandb logging and run comparison.

:func:`write_report` turns the dict from :func:`fairclip.eval.run.evaluate_model` into
``report.json``, ``report.md`` and PNG plots in one directory; :func:`compare_reports`
renders two or more reports side by side.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fairclip.files import atomic_write_text
from fairclip.report.comparison import compare_reports
from fairclip.report.io import (
    COMPARISON_SCHEMA,
    REPORT_FILE,
    REPORT_SCHEMA,
    flatten_metrics,
    headline_keys,
    load_report,
    save_json,
    to_json,
)
from fairclip.report.markdown import comparison_markdown, report_markdown
from fairclip.report.plots import plot_comparison, plot_group_accuracy, plot_skew_per_query
from fairclip.report.wandb_log import log_report, log_to_wandb, report_tables

__all__ = [
    "COMPARISON_SCHEMA",
    "REPORT_FILE",
    "REPORT_SCHEMA",
    "compare_reports",
    "comparison_markdown",
    "flatten_metrics",
    "headline_keys",
    "load_report",
    "log_report",
    "log_to_wandb",
    "plot_comparison",
    "plot_group_accuracy",
    "plot_skew_per_query",
    "report_markdown",
    "report_tables",
    "save_json",
    "to_json",
    "write_report",
]


def write_report(
    report: Mapping[str, Any], out_dir: str | Path, plots: bool = True
) -> dict[str, Path]:
    """Write report.json, report.md and (``plots``) PNGs; return ``{"json", "md", "plot:*"}``."""
    out = Path(out_dir)
    files: dict[str, Path] = {"json": out / REPORT_FILE, "md": out / "report.md"}
    if plots:
        made = {"group_accuracy": plot_group_accuracy(report, out / "plots" / "group_accuracy.png")}
        for name in report.get("queries", {}):
            made[f"skew_{name}"] = plot_skew_per_query(
                report, name, out / "plots" / f"skew_{name}.png"
            )
        files.update({f"plot:{k}": v for k, v in made.items() if v is not None})
    save_json(report, files["json"])
    rel = {
        k.removeprefix("plot:"): str(v.relative_to(out))
        for k, v in files.items()
        if k.startswith("plot:")
    }
    atomic_write_text(files["md"], report_markdown(report, rel) + "\n")
    return files
