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


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def audit_markdown(result: Mapping[str, Any]) -> str:
    """The audit's report: ablation table, per-class Cramér's V, the ablation curve, the
    TextSpan descriptions of the top heads, and the top heads per attribute value."""
    attribute = result["attribute"]
    parts = [f"## Ablation ({attribute}, heads by {result['head_score']})\n",
             ablation_markdown(result["rows"])]  # fmt: skip
    per_class = result.get("per_class") or {}
    if per_class.get("original"):
        parts.append(f"\n## Per-class Cramér's V ({attribute} × predicted as the class)\n")
        parts.append("| class | original | top heads ablated |\n|---|---|---|\n")
        for name, value in list(per_class["original"].items())[:10]:
            parts.append(
                f"| {name} | {value:.4f} | {per_class['top'].get(name, float('nan')):.4f} |\n"
            )
    curve = result.get("curve") or []
    if curve:
        keys = [k for k in curve[0] if k != "heads"]
        parts.append("\n## Ablation curve (top n heads vs layer-matched random)\n")
        parts.append("| heads | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n")
        for row in curve:
            parts.append(f"| {row['heads']} | " + " | ".join(_fmt(row[k]) for k in keys) + " |\n")
    described = result.get("textspan") or []
    if described:
        parts.append("\n## TextSpan descriptions of the top heads\n")
        parts.append("| head | scores | explained (random) | descriptions |\n|---|---|---|---|\n")
        for row in described:
            scores = ", ".join(f"{a} {v:.3f}" for a, v in row["scores"].items())
            texts = "; ".join(row["texts"])
            parts.append(
                f"| L{row['head'][0]}H{row['head'][1]} | {scores} | {row['explained']:.3f} "
                f"({row['random_explained']:.3f}) | {texts} |\n"
            )
    for name, info in (result.get("attributes") or {}).items():
        per_value = info.get("per_value")
        if per_value is None:
            continue
        parts.append(f"\n## Top heads per value of {name} (one-vs-rest projection)\n")
        parts.append("| value | top heads |\n|---|---|\n")
        for value, grid in zip(info["values"], per_value, strict=True):
            flat = [(s, layer, h) for layer, row in enumerate(grid) for h, s in enumerate(row)
                    if s == s]  # fmt: skip
            best = sorted(flat, reverse=True)[:3]
            heads = ", ".join(f"L{layer}H{h} ({s:.3f})" for s, layer, h in best) or "-"
            parts.append(f"| {value} | {heads} |\n")
    return "".join(parts)


def plot_attribute_scores(
    scores: Mapping[str, Tensor],
    values: Sequence[str],
    attribute: str,
    path: Path,
    chosen: Sequence[Sequence[int]] = (),
) -> Path:
    """Layer × head heatmaps of one attribute: one panel per value (one-vs-rest projection)
    and one for the multinomial probe; chosen heads boxed."""
    panels = [(f"{attribute}={v}", scores["per_value"][i]) for i, v in enumerate(values)]
    if "probe" in scores:
        panels.append((f"{attribute}: probe accuracy", scores["probe"]))
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(3.6 * cols, 3.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, grid) in zip(axes.flat, panels, strict=False):
        im = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto")
        ax.set(title=title, xlabel="head", ylabel="layer")
        for layer, h in chosen:
            ax.add_patch(Rectangle((h - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def plot_curve(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Each metric against the number of ablated heads: top heads vs the random control."""
    keys = [k for k in rows[0] if k != "heads" and not k.startswith("random/")]
    fig = Figure(figsize=(4.2 * len(keys), 3.2))
    axes = fig.subplots(1, len(keys), squeeze=False)
    n = [r["heads"] for r in rows]
    for ax, key in zip(axes[0], keys, strict=True):
        ax.plot(n, [r[key] for r in rows], marker="o", label="top heads")
        if f"random/{key}" in rows[0]:
            ax.plot(n, [r[f"random/{key}"] for r in rows], marker="s", ls="--",
                    label="layer-matched random")  # fmt: skip
        ax.set(title=key, xlabel="heads ablated")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, Path(path))
