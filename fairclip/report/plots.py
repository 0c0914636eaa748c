"""Report plots: per-group accuracy, skew per query, and a before/after comparison.

Figures use matplotlib's object API with the Agg canvas (no pyplot state, no backend switch,
safe in a training process) and are written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fairclip.files import atomic_path
from fairclip.report.io import flatten_metrics, headline_keys


def save_figure(fig: Figure, path: Path) -> Path:
    """Lay out ``fig`` and write it as PNG atomically (temp file + rename)."""
    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def _finite(v: Any) -> float:
    return float(v) if v is not None and math.isfinite(float(v)) else 0.0


def plot_group_accuracy(report: Mapping[str, Any], path: str | Path) -> Path | None:
    """Bars of zero-shot accuracy per attribute value, overall accuracy as a line."""
    zs = report.get("metrics", {}).get("zeroshot")
    if not zs:
        return None
    attributes = report["settings"]["attributes"]
    fig = Figure(figsize=(3.2 * len(attributes) + 0.8, 3.4))
    axes = fig.subplots(1, len(attributes), squeeze=False)[0]
    for ax, (attr, values) in zip(axes, attributes.items(), strict=True):
        accs = [_finite(zs.get(f"acc/{attr}={v}")) for v in values]
        ax.bar(range(len(values)), accs, color="tab:blue")
        ax.axhline(_finite(zs["acc"]), color="black", linestyle="--", linewidth=1, label="all")
        ax.set_xticks(range(len(values)), values, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(
            f"{attr}: worst {_finite(zs.get(f'worst_group_acc/{attr}')):.2f}, "
            f"gap {_finite(zs.get(f'group_gap/{attr}')):.2f}",
            fontsize=9,
        )
        ax.set_ylabel("zero-shot accuracy")
    axes[0].legend(fontsize=8)
    return save_figure(fig, Path(path))


def plot_skew_per_query(
    report: Mapping[str, Any],
    query_set: str,
    path: str | Path,
    k: int | None = None,
    target: str = "eq_opp",
) -> Path | None:
    """MaxSkew@k and MinSkew@k of every query of ``query_set``, one panel per attribute."""
    q = report.get("queries", {}).get(query_set)
    if not q:
        return None
    k = k or report["settings"]["skew_ks"][0]
    attrs = q["attributes"]
    n = len(q["prompts"])
    fig = Figure(figsize=(3.6 * len(attrs) + 2.5, 0.9 + 0.24 * n))
    axes = fig.subplots(1, len(attrs), squeeze=False, sharey=True)[0]
    ys = list(range(n))
    for ax, attr in zip(axes, attrs, strict=True):
        mx = [_finite(v) for v in q["values"].get(f"maxskew@{k}/{attr}/{target}", [0.0] * n)]
        mn = [_finite(v) for v in q["values"].get(f"minskew@{k}/{attr}/{target}", [0.0] * n)]
        ax.barh(ys, mx, color="tab:red", label=f"MaxSkew@{k}")
        ax.barh(ys, mn, color="tab:blue", label=f"MinSkew@{k}")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(f"{query_set}: {attr} ({target})", fontsize=9)
        ax.set_xlabel("skew = ln(top-k share / p*)")
    axes[0].set_yticks(ys, q["prompts"], fontsize=7)
    axes[0].invert_yaxis()
    axes[-1].legend(fontsize=7, loc="best")
    return save_figure(fig, Path(path))


def plot_comparison(
    reports: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    path: str | Path,
    keys: Sequence[str] | None = None,
) -> Path:
    """Grouped horizontal bars of the headline metrics of each run (before/after)."""
    flats = [flatten_metrics(r) for r in reports]
    if keys is None:
        keys = [k for k in headline_keys(reports[0]) if all(k in f for f in flats)]
    if not keys:
        raise ValueError("compare: the reports share no metric to plot")
    n, runs = len(keys), len(reports)
    height = 0.8 / runs
    fig = Figure(figsize=(8, 1.0 + 0.32 * n * max(runs / 2, 1)))
    ax = fig.subplots()
    for i, (flat, label) in enumerate(zip(flats, labels, strict=True)):
        ys = [j + i * height for j in range(n)]
        ax.barh(ys, [_finite(flat[k]) for k in keys], height=height, label=label)
    ax.set_yticks([j + height * (runs - 1) / 2 for j in range(n)], keys, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.legend(fontsize=8)
    ax.set_title("bias report comparison", fontsize=10)
    return save_figure(fig, Path(path))
