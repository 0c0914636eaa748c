"""The attention-head audit's table (markdown) and score plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from fairclip.report.plots import save_figure


def ablation_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    keys = [k for k in rows[0] if k not in ("variant", "heads")]
    lines = [
        "| variant | heads | " + " | ".join(keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for r in rows:
        heads = " ".join(f"L{a}H{b}" for a, b in r["heads"]) or "-"
        lines.append(
            f"| {r['variant']} | {heads} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |"
        )
    return "\n".join(lines) + "\n"


def plot_scores(
    scores: Mapping[str, Tensor], path: Path, chosen: Sequence[Sequence[int]] = ()
) -> Path:
    """Layer × head heatmaps, one panel per score; chosen heads boxed."""
    names = [n for n in ("projection", "probe") if n in scores]
    fig = Figure(figsize=(4.5 * len(names), 3.5))
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        s = scores[name].numpy()
        im = ax.imshow(s, cmap="viridis", aspect="auto")
        ax.set(title=name, xlabel="head", ylabel="layer")
        ax.set_xticks(range(s.shape[1]))
        ax.set_yticks(range(s.shape[0]))
        for layer, h in chosen:
            ax.add_patch(Rectangle((h - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
        fig.colorbar(im, ax=ax)
    return save_figure(fig, Path(path))
