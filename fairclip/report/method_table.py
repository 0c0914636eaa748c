"""The debias comparison as markdown (table, seed ranges, score-gap note), the skew-by-depth
plot, and the wandb run."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from omegaconf import DictConfig

from fairclip.report.plots import save_figure
from fairclip.report.wandb_log import log_to_wandb
from fairclip.runtime import stable_id

DEPTH_PLOT = "compare_depth.png"


def markdown_table(rows: Mapping[str, Mapping[str, float]], sae_info: Mapping[str, Any]) -> str:
    lines = rows_markdown(rows)
    if sae_info:
        lines.append("")
        lines.append(
            "SAE (text, SEM rows): "
            + ", ".join(
                f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in sae_info.items()
            )
        )
    return "\n".join(lines)


def rows_markdown(rows: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Rows as a markdown table; a column that is NaN in every row (e.g. accuracy on a face
    dataset without concepts) is left out (compare.json keeps it)."""
    cols = [
        c
        for c in next(iter(rows.values()))
        if any(not (isinstance(r[c], float) and math.isnan(r[c])) for r in rows.values())
    ]
    return [
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
        *(
            f"| {name} | " + " | ".join(_fmt(vals[c]) for c in cols) + " |"
            for name, vals in rows.items()
        ),
    ]


def plot_skew_by_depth(
    depth: Mapping[str, Mapping[str, float]],
    ks: Sequence[int],
    path: Path,
    queries: str = "concepts",
) -> Path:
    """MaxSkew@k and NDKL@k against k, one line per method (``compare_depth.png``)."""
    fig = Figure(figsize=(9, 3.6))
    axes = fig.subplots(1, 2)
    for ax, name in zip(axes, ("maxskew", "ndkl"), strict=True):
        for method, vals in depth.items():
            ax.plot(ks, [vals[f"{name}@{k}"] for k in ks], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_xticks(list(ks), [str(k) for k in ks])
        ax.set_xlabel("k (ranking depth)")
        ax.set_title(f"{'MaxSkew' if name == 'maxskew' else 'NDKL'}@k of the {queries} queries")
    axes[1].legend(fontsize=7)
    return save_figure(fig, path)


def _fmt(v: float) -> str:
    return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.4f}"


def score_gap_note(gap: Mapping[str, float], attribute: str) -> str:
    return (
        f"\n\nWhere clip's {attribute} score gap lives (class prompts vs each value's images "
        f"of the class, `score_gap` in compare.json): {gap['gap']:.4f} in all; "
        f"{gap['gap_lean']:.4f} along the bias-prompt directions (the prompts' lean: what "
        f"Orth-Proj removes and SEM targets), {gap['gap_rest']:.4f} elsewhere, which cancels "
        f"{gap['offset']:.0%} of the lean (near 100%: the model is fair only because the two "
        "cancel, and removing the lean flips the gap)."
    )


def log_compare_to_wandb(cfg: DictConfig, result: Mapping[str, Any], out_dir: Path) -> None:
    """The table, depth table, per-seed rows and plot to a wandb run in ``out_dir`` (offline
    unless logged in), as ``fairclip-eval`` does with its report; ``wandb.enabled=false``
    turns it off."""
    w = cfg.get("wandb") or {}
    if not w.get("enabled"):
        return
    settings = {
        "methods": list(cfg.methods), "attribute": str(cfg.attribute),
        "query_set": str(cfg.query_set), "target": str(cfg.target), "k": int(cfg.table_k),
        "seeds": result.get("seeds", [int(cfg.seed)]),
    }  # fmt: skip
    log_to_wandb(
        {**result, "settings": settings},
        {f"plot:{DEPTH_PLOT.removesuffix('.png')}": out_dir / DEPTH_PLOT},
        out_dir,
        project=str(w.get("project", "fairclip")),
        name=w.get("name"),
        group=w.get("group"),
        tags=list(w.get("tags") or []),
        offline=bool(w.get("offline", True)),
        run_id=stable_id(str(out_dir.resolve())),
    )


def seeds_note(seeds: Sequence[int], spread: Mapping[str, Mapping[str, Any]]) -> str:
    """Under a mean table: the seeds and each row's range (min..max) of the main columns
    (from :func:`_spread`)."""
    cols = [c for c in next(iter(spread.values())) if c != "cramers_v"]
    lines = [
        "",
        "",
        f"Mean over seeds {list(seeds)} (every row refit per seed); range min..max over seeds:",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, by_col in spread.items():
        cells = [f"{by_col[c]['min']:.3f}..{by_col[c]['max']:.3f}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
