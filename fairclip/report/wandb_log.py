"""Log a report (or a comparison) to Weights & Biases as tables, images and summary values.

Offline by default (``fairclip.runtime.wandb_offline``): the run lands in
``<out>/wandb/offline-run-*`` and can be synced later with ``wandb sync``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fairclip.report.io import flatten_metrics


def _plot_images(files: Mapping[str, Path], prefix: str) -> dict[str, Any]:
    """The ``plot:<name>`` entries of ``files`` as wandb images under ``<prefix>/plots/``."""
    import wandb  # lazy: wandb is slow to import and only runs that log to it need it

    return {
        f"{prefix}/plots/{name.removeprefix('plot:')}": wandb.Image(str(path))
        for name, path in files.items()
        if name.startswith("plot:")
    }


def report_tables(report: Mapping[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """``name -> (columns, rows)`` for the metrics, the per-group accuracy and per-query skew."""
    tables: dict[str, tuple[list[str], list[list[Any]]]] = {
        "metrics": (["metric", "value"], [[k, v] for k, v in flatten_metrics(report).items()])
    }
    zs = report.get("metrics", {}).get("zeroshot")
    if zs:
        rows = []
        for attr, values in report["settings"]["attributes"].items():
            counts = report["splits"].get("eval", {}).get("group_counts", {}).get(attr, {})
            rows += [[attr, v, zs.get(f"acc/{attr}={v}"), counts.get(v)] for v in values]
        tables["group_accuracy"] = (["attribute", "value", "accuracy", "images"], rows)
    for name, q in report.get("queries", {}).items():
        keys = list(q["values"])
        rows = [
            [prompt, *[q["values"][k][i] for k in keys]] for i, prompt in enumerate(q["prompts"])
        ]
        tables[f"skew_per_query/{name}"] = (["query", *keys], rows)
    return tables


def log_report(
    run: Any,
    report: Mapping[str, Any],
    files: Mapping[str, Path],
    prefix: str = "bias_eval",
    step: int | None = None,
) -> None:
    """Log to an open wandb run (e.g. a Lightning ``WandbLogger.experiment``)."""
    import wandb  # lazy: wandb is slow to import and only runs that log to it need it

    payload: dict[str, Any] = {
        f"{prefix}/{name}": wandb.Table(columns=cols, data=rows)
        for name, (cols, rows) in report_tables(report).items()
    }
    payload.update(_plot_images(files, prefix))
    if step is None:
        run.log(payload)
    else:
        run.log(payload, step=step)
    run.summary.update({f"{prefix}/{k}": v for k, v in flatten_metrics(report).items()})


def log_comparison(
    run: Any,
    comparison: Mapping[str, Any],
    files: Mapping[str, Path],
    prefix: str = "bias_compare",
) -> None:
    import wandb  # lazy: wandb is slow to import and only runs that log to it need it

    labels = [r["label"] for r in comparison["runs"]]
    rows = [[k, *vals, comparison["delta"].get(k)] for k, vals in comparison["metrics"].items()]
    payload: dict[str, Any] = {
        f"{prefix}/metrics": wandb.Table(columns=["metric", *labels, "delta"], data=rows)
    }
    payload.update(_plot_images(files, prefix))
    run.log(payload)


def _method_rows(rows: Mapping[str, Mapping[str, float]]) -> tuple[list[str], list[list[Any]]]:
    cols = list(next(iter(rows.values())))
    return ["method", *cols], [[name, *(r[c] for c in cols)] for name, r in rows.items()]


def log_debias_table(
    run: Any, result: Mapping[str, Any], files: Mapping[str, Path], prefix: str = "debias_compare"
) -> None:
    """The debiasing-methods table of ``fairclip-debias``: the table and the
    by-depth table (means over seeds), one row per (seed, method) when there are seeds, the
    depth plot, and every finite cell as a summary value ``<prefix>/<method>/<column>``."""
    import wandb  # lazy: wandb is slow to import and only runs that log to it need it

    tables = {"table": _method_rows(result["rows"]), "depth": _method_rows(result["depth"])}
    if result.get("per_seed"):
        cols = tables["table"][0]
        rows = [[s["seed"], *r] for s in result["per_seed"] for r in _method_rows(s["rows"])[1]]
        tables["per_seed"] = (["seed", *cols], rows)
    payload: dict[str, Any] = {
        f"{prefix}/{name}": wandb.Table(columns=cols, data=rows)
        for name, (cols, rows) in tables.items()
    }
    payload.update(_plot_images(files, prefix))
    run.log(payload)
    run.summary.update(
        {
            f"{prefix}/{method}/{col}": v
            for method, row in result["rows"].items()
            for col, v in row.items()
            if isinstance(v, float) and math.isfinite(v)
        }
    )


def log_to_wandb(
    report: Mapping[str, Any],
    files: Mapping[str, Path],
    out_dir: str | Path,
    project: str = "fairclip",
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    offline: bool = True,
    run_id: str | None = None,
) -> Path:
    """Open a wandb run in ``out_dir`` (offline unless told otherwise), log, finish.

    Returns the run's local directory (``<out_dir>/wandb/offline-run-*`` when offline).
    """
    import wandb  # lazy: wandb is slow to import and only runs that log to it need it

    run = wandb.init(
        project=project,
        name=name,
        group=group,
        tags=list(tags),
        id=run_id,
        dir=str(out_dir),
        mode="offline" if offline else "online",
        resume="allow",
        config={"model": report.get("model"), "settings": report.get("settings")},
        reinit="finish_previous",
    )
    try:
        schema = report.get("schema", "")
        if schema.startswith("fairclip.bias_comparison"):
            log_comparison(run, report, files)
        elif schema.startswith("fairclip.debias_compare"):
            log_debias_table(run, report, files)
        else:
            log_report(run, report, files)
        run_dir = Path(run.dir).parent
    finally:
        run.finish()
    return run_dir
